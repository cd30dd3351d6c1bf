# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCXX_COMPILER=clang++-14] [-DGENERATOR=...]
#       [-DFILTER=...] [-DJOBS=...] -P RunTsanTests.cmake
# Builds the kernel, method and concurrency tests (test_kernels, which holds
# tests/test_concurrency.cpp, test_prefill_methods, test_decode_methods) with ThreadSanitizer
# (clang++-14, -fsanitize=thread -O1 -g1, assertions on) and runs them; any TSan report fails the
# test (exit code 66). Prints "tsan_tests: SKIPPED" (ctest reports the test as skipped) when
# clang++-14 or its TSan runtime (Debian: clang-14 libclang-rt-14-dev) is missing.
#
# Without OpenMP: its runtime (libgomp, libomp) is not TSan-instrumented, so its barriers would be
# reported as races. The nested build finds a stub FindOpenMP (written below: "found", with no
# target and no flags), so nothing is compiled with -fopenmp and the library's default executor is
# not OpenMP; -DSPARSE_ATTN_DEFAULT_EXECUTOR=::TsanDefaultExecutor with
# -include tests/tsan_default_executor.hpp makes it a std::thread pool (exec/default.hpp), so every
# call that passes num_threads runs on that many std::threads (0: 4), which TSan sees.
# Concurrency.DefaultExecutorRunsItemsOnSeveralThreads checks that it does.
#
# FILTER: one gtest filter for all three executables; the default skips what is slow under TSan
# and runs no thread code the rest misses (docs/ROBUSTNESS.md). -DFILTER=* runs everything.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunTsanTests: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED FILTER)
  set(FILTER "-Fidelity*:Precision.TinyLlama*")
endif()
if(NOT DEFINED JOBS)
  set(JOBS 2)
endif()

if(NOT CXX_COMPILER)
  find_program(CXX_COMPILER NAMES clang++-14)
endif()
if(NOT CXX_COMPILER)
  message("tsan_tests: SKIPPED: clang++-14 not found (apt-get install clang-14 libclang-rt-14-dev)")
  return()
endif()
# The static TSan runtime, linked by hand: clang++ would also link libclang_rt.tsan_cxx, whose
# operator new/delete collide with the ones tests/test_embedding.cpp defines to count and fail
# allocations (and the shared runtime, -shared-libsan, crashes at start with clang 14). The link
# line repeats CMAKE_CXX_FLAGS, so -fno-sanitize=thread comes first to keep the driver from adding
# the runtimes itself. Without
# tsan_cxx, new/delete are the test's or libstdc++'s, on malloc/free, which TSan intercepts.
execute_process(COMMAND ${CXX_COMPILER} -print-file-name=libclang_rt.tsan-x86_64.a
                OUTPUT_VARIABLE tsan_rt OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
set(tsan_link "-fno-sanitize=thread -Wl,--whole-archive ${tsan_rt} -Wl,--no-whole-archive -Wl,--dynamic-list=${tsan_rt}.syms -Wl,--no-as-needed -lpthread -lrt -lm -ldl")
separate_arguments(tsan_link_list UNIX_COMMAND "${tsan_link}")
# Does it build and run a threaded program that way (the runtime is libclang-rt-14-dev)?
file(MAKE_DIRECTORY ${WORK_DIR})
file(WRITE ${WORK_DIR}/probe.cpp
     "#include <thread>\nint main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); return x - 1; }\n")
set(rc 1)
if(EXISTS "${tsan_rt}")
  execute_process(COMMAND ${CXX_COMPILER} -fsanitize=thread -c ${WORK_DIR}/probe.cpp -o ${WORK_DIR}/probe.o
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
endif()
if(rc EQUAL 0)
  execute_process(COMMAND ${CXX_COMPILER} ${WORK_DIR}/probe.o -o ${WORK_DIR}/probe ${tsan_link_list}
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
endif()
if(rc EQUAL 0)
  execute_process(COMMAND ${WORK_DIR}/probe RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
endif()
if(NOT rc EQUAL 0)
  message("tsan_tests: SKIPPED: ${CXX_COMPILER} cannot build and run a -fsanitize=thread program "
          "(install libclang-rt-14-dev)")
  return()
endif()

# find_package(OpenMP) of the nested build: found, without flags or a target.
file(WRITE ${WORK_DIR}/no_openmp/FindOpenMP.cmake
     "# RunTsanTests.cmake: no OpenMP in the TSan build (no -fopenmp, no OpenMP::OpenMP_CXX).\n"
     "set(OpenMP_FOUND TRUE)\nset(OpenMP_CXX_FOUND TRUE)\n")

set(build_dir ${WORK_DIR}/build)
set(tsan "-fsanitize=thread")
set(default_executor "-DSPARSE_ATTN_DEFAULT_EXECUTOR=::TsanDefaultExecutor -include ${SOURCE_DIR}/tests/tsan_default_executor.hpp")
# Build type "Tsan" has no flags of its own: only these (no -O2, no -DNDEBUG).
set(args -S ${SOURCE_DIR} -B ${build_dir} -DCMAKE_BUILD_TYPE=Tsan
         -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
         "-DCMAKE_CXX_FLAGS=${tsan} -fno-omit-frame-pointer -O1 -g1 ${default_executor}"
         "-DCMAKE_EXE_LINKER_FLAGS=${tsan_link}"
         -DCMAKE_MODULE_PATH=${WORK_DIR}/no_openmp
         -DSPARSE_ATTN_BUILD_TOOLS=OFF -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF
         -DSPARSE_ATTN_BUILD_EXAMPLES=OFF -DSPARSE_ATTN_INSTALL=OFF
         -DSPARSE_ATTN_PORTABLE_TEST=OFF -DSPARSE_ATTN_SANITIZER_TEST=OFF
         -DSPARSE_ATTN_TSAN_TEST=OFF -DSPARSE_ATTN_FUZZ_SMOKE_TEST=OFF
         -DSPARSE_ATTN_MULTI_ARCH_TEST=OFF -DSPARSE_ATTN_AARCH64_TEST=OFF
         -DSPARSE_ATTN_STRICT_CONSUMER_TEST=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()

set(targets test_kernels test_prefill_methods test_decode_methods)
# halt_on_error: the first report ends the run with exitcode 66 (a failed step);
# second_deadlock_stack: both stacks of a lock-order inversion.
set(env TSAN_OPTIONS=halt_on_error=1:exitcode=66:second_deadlock_stack=1:history_size=4)

set(RUN_STEP_JOB tsan_tests)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

run_step(configure ${CMAKE_COMMAND} ${args})
run_step(build ${CMAKE_COMMAND} --build ${build_dir} --target ${targets} -j${JOBS})
# The executables must not load an OpenMP runtime.
find_program(LDD ldd)
if(LDD)
  foreach(t ${targets})
    execute_process(COMMAND ${LDD} ${build_dir}/tests/${t} OUTPUT_VARIABLE libs ERROR_QUIET)
    if(libs MATCHES "lib(g|i)?omp")
      message(FATAL_ERROR "tsan_tests: ${t} links an OpenMP runtime:\n${libs}")
    endif()
  endforeach()
endif()
foreach(t ${targets})
  run_step(${t} ${CMAKE_COMMAND} -E env ${env}
           ${build_dir}/tests/${t} --gtest_brief=1 --gtest_filter=${FILTER})
endforeach()
