# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCXX_COMPILER=...] [-DGENERATOR=...] [-DTOOL=ON|OFF]
#       [-DJOBS=...] -P RunPortableTests.cmake
# Builds every library test (test_kernels, test_prefill_methods, test_decode_methods,
# test_hardening; with TOOL=ON also the sparse-attn tool and test_tool) for the portable baseline
# (-march=x86-64-v2: no AVX, generic Eigen packets, no AVX-512 paths) and runs them all, so every
# ISA path the headers pick is tested by the whole suite, not only by the kernel tests.
# TOOL defaults to OFF: the tool needs CLI11 and nlohmann_json, which a bare checkout may lack;
# tests/CMakeLists.txt passes its own SPARSE_ATTN_BUILD_TOOLS.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunPortableTests: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED TOOL)
  set(TOOL OFF)
endif()
if(NOT DEFINED JOBS)
  set(JOBS 2)
endif()

# Build type "Portable": -O1 for every target, the tool's -O3 and the tests' FAST_BUILD -O2 being
# Release-only. This build exists to check results on the generic paths, not their speed, and the
# nested compile of the header-only library in each translation unit dominates its cost (see
# docs/ROBUSTNESS.md for the measured times). NDEBUG as in Release: the asserts run in the
# sanitizer build already.
set(args -S ${SOURCE_DIR} -B ${WORK_DIR} -DCMAKE_BUILD_TYPE=Portable
         "-DCMAKE_CXX_FLAGS_PORTABLE=-O1 -DNDEBUG"
         -DSPARSE_ATTN_NATIVE=OFF -DSPARSE_ATTN_ARCH=
         -DSPARSE_ATTN_BUILD_TOOLS=${TOOL} -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF
         -DSPARSE_ATTN_BUILD_EXAMPLES=OFF -DSPARSE_ATTN_INSTALL=OFF
         -DSPARSE_ATTN_PORTABLE_TEST=OFF -DSPARSE_ATTN_SANITIZER_TEST=OFF
         -DSPARSE_ATTN_FUZZ_SMOKE_TEST=OFF -DSPARSE_ATTN_MULTI_ARCH_TEST=OFF
         -DSPARSE_ATTN_AARCH64_TEST=OFF -DSPARSE_ATTN_STRICT_CONSUMER_TEST=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

set(targets test_kernels test_prefill_methods test_decode_methods test_hardening)
if(TOOL)
  list(APPEND targets test_tool)
endif()
# Two OpenMP threads: CI has two cores.
set(env OMP_NUM_THREADS=2)

function(run_step name)
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  string(TIMESTAMP t1 "%s")
  math(EXPR dt "${t1} - ${t0}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "portable_tests: step '${name}' failed (${rc}) after ${dt} s")
  endif()
  message(STATUS "portable_tests: ${name} ok (${dt} s)")
endfunction()

run_step(configure ${CMAKE_COMMAND} ${args})
# "all" is exactly the test executables (and the tool test_tool runs) here, and unlike a --target
# list it compiles them in parallel.
run_step(build ${CMAKE_COMMAND} --build ${WORK_DIR} -j${JOBS})
foreach(t ${targets})
  run_step(${t} ${CMAKE_COMMAND} -E env ${env} ${WORK_DIR}/tests/${t} --gtest_brief=1)
endforeach()
