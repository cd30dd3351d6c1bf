# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCXX_COMPILER=...] [-DGENERATOR=...] [-DTOOL=ON|OFF]
#       [-DTARGETS=auto;generic] [-DJOBS=...] -P RunPortableTests.cmake
# Builds every library test (test_kernels, test_prefill_methods, test_decode_methods,
# test_hardening; with TOOL=ON also the sparse-attn tool and test_tool) for the portable baseline
# -march=x86-64-v2 and runs them all once per CPU target in TARGETS. Such a build holds the generic
# kernels (Eigen's SSE packets) and the run-time dispatched AVX2 / AVX-512 / AVX-512-BF16 ones
# (arch/target.hpp): "auto" runs what the portable binary picks on this CPU (its best target, code
# compiled by target attribute, not by -march as in the main build), "generic" forces the baseline
# every x86-64 CPU runs (SPARSE_ATTN_TARGET=generic). The targets between the two are checked by
# test_kernels' Targets.* tests in both runs. TOOL defaults to OFF: the tool needs CLI11 and
# nlohmann_json, which a bare checkout may lack; tests/CMakeLists.txt passes its own
# SPARSE_ATTN_BUILD_TOOLS.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunPortableTests: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED TOOL)
  set(TOOL OFF)
endif()
if(NOT DEFINED TARGETS)
  set(TARGETS auto generic)
endif()
if(NOT DEFINED JOBS)
  set(JOBS 2)
endif()

# Build type "Portable": -O1 -DNDEBUG for every executable (Release would give the tests -O2 and
# the tool -O3). This build checks results, not speed, and compiling the header-only library once
# per translation unit is most of its cost: -O1 cuts that by a third (docs/ROBUSTNESS.md has the
# times). NDEBUG as in Release: the sanitizer build runs the asserts.
set(args -S ${SOURCE_DIR} -B ${WORK_DIR} -DCMAKE_BUILD_TYPE=Portable
         "-DCMAKE_CXX_FLAGS_PORTABLE=-O1 -DNDEBUG"
         -DSPARSE_ATTN_NATIVE=OFF -DSPARSE_ATTN_ARCH=
         -DSPARSE_ATTN_BUILD_TOOLS=${TOOL} -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF
         -DSPARSE_ATTN_BUILD_EXAMPLES=OFF -DSPARSE_ATTN_INSTALL=OFF
         -DSPARSE_ATTN_PORTABLE_TEST=OFF -DSPARSE_ATTN_SANITIZER_TEST=OFF
         -DSPARSE_ATTN_FUZZ_SMOKE_TEST=OFF -DSPARSE_ATTN_MULTI_ARCH_TEST=OFF
         -DSPARSE_ATTN_AARCH64_TEST=OFF -DSPARSE_ATTN_STRICT_CONSUMER_TEST=OFF
         -DSPARSE_ATTN_WITH_MPI=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

set(tests test_kernels test_prefill_methods test_decode_methods test_hardening)
if(TOOL)
  list(APPEND tests test_tool)
endif()

set(RUN_STEP_JOB portable_tests)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

run_step(configure ${CMAKE_COMMAND} ${args})
# "all" is exactly the test executables (and the tool test_tool runs; the MPI layer's tests are
# off) here, and unlike a --target list it compiles them in parallel.
run_step(build ${CMAKE_COMMAND} --build ${WORK_DIR} -j${JOBS})
foreach(target IN LISTS TARGETS)
  # Two OpenMP threads: CI has two cores. "auto": no override, even one from the caller's env.
  if(target STREQUAL "auto")
    set(env --unset=SPARSE_ATTN_TARGET OMP_NUM_THREADS=2)
  else()
    set(env SPARSE_ATTN_TARGET=${target} OMP_NUM_THREADS=2)
  endif()
  foreach(t IN LISTS tests)
    run_step("${t} (${target})" ${CMAKE_COMMAND} -E env ${env} ${WORK_DIR}/tests/${t} --gtest_brief=1)
  endforeach()
endforeach()
