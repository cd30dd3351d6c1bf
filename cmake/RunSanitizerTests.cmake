# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCXX_COMPILER=...] [-DGENERATOR=...] [-DFILTER=...]
#       [-DJOBS=...] -P RunSanitizerTests.cmake
# Builds the library tests (test_kernels, test_prefill_methods, test_decode_methods,
# test_hardening) with AddressSanitizer + UndefinedBehaviorSanitizer at -O1 (frame pointers kept,
# assertions on: no NDEBUG) and runs them with leak detection; any ASan, LSan or UBSan report fails
# the test. OpenMP is the compiler's own runtime (libgomp with GCC). docs/ROBUSTNESS.md says what
# this covers, what it costs in CI and how to read a report. FILTER: a gtest filter; the default
# skips Fidelity* (eval/ accuracy sweeps over data files: minutes under ASan, and no kernel path
# the other tests miss). -DFILTER=* runs everything.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunSanitizerTests: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED FILTER)
  set(FILTER "-Fidelity*")
endif()
if(NOT DEFINED JOBS)
  set(JOBS 2)
endif()

set(sanitize "-fsanitize=address,undefined -fno-sanitize-recover=undefined")
# Build type "Sanitize" has no flags of its own: only these (no -O3/-O2, no -DNDEBUG).
set(args -S ${SOURCE_DIR} -B ${WORK_DIR} -DCMAKE_BUILD_TYPE=Sanitize
         "-DCMAKE_CXX_FLAGS=${sanitize} -fno-omit-frame-pointer -O1 -g1"
         "-DCMAKE_EXE_LINKER_FLAGS=${sanitize}"
         -DSPARSE_ATTN_BUILD_TOOLS=OFF -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF
         -DSPARSE_ATTN_BUILD_EXAMPLES=OFF -DSPARSE_ATTN_INSTALL=OFF
         -DSPARSE_ATTN_PORTABLE_TEST=OFF -DSPARSE_ATTN_SANITIZER_TEST=OFF
         -DSPARSE_ATTN_FUZZ_SMOKE_TEST=OFF
         -DSPARSE_ATTN_WITH_MPI=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

set(targets test_kernels test_prefill_methods test_decode_methods test_hardening)
# halt_on_error: the first UBSan report aborts; detect_leaks: LSan runs at exit (ASan's default
# on x86_64 Linux, made explicit). Two OpenMP threads: CI has two cores.
set(env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_init_order=1
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
        OMP_NUM_THREADS=2)

set(RUN_STEP_JOB sanitizer_tests)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

run_step(configure ${CMAKE_COMMAND} ${args})
# "all" is just the tests here (tools, benchmarks, examples and the MPI layer's tests off), and
# unlike a --target list it compiles the test executables in parallel.
run_step(build ${CMAKE_COMMAND} --build ${WORK_DIR} -j${JOBS})
foreach(t ${targets})
  run_step(${t} ${CMAKE_COMMAND} -E env ${env}
           ${WORK_DIR}/tests/${t} --gtest_brief=1 --gtest_filter=${FILTER})
endforeach()
