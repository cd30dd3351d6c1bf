# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DEIGEN3_DIR=...] [-DGENERATOR=...] [-DFILTER=...]
#       [-DJOBS=...] -P RunAarch64Tests.cmake
# Cross-compiles test_kernels for aarch64 (cmake/toolchains/aarch64-linux-gnu.cmake: Debian's
# aarch64-linux-gnu-g++, its libgomp, GoogleTest built from /usr/src/googletest, the host's
# header-only Eigen) at -march=armv8-a (NEON, no SVE) and runs it under
# qemu-aarch64 -L /usr/aarch64-linux-gnu, so the non-x86 paths of the headers (generic packets,
# Eigen's NEON code, the aarch64 ISA tag) build and compute the right results. Prints
# "aarch64_tests: SKIPPED" (ctest reports the test as skipped) when the cross compiler or
# qemu-aarch64 is not installed (Debian: g++-aarch64-linux-gnu qemu-user).
#
# FILTER: a gtest filter. Under qemu every instruction is emulated, and test_kernels' Fidelity*
# tests (eval/ accuracy sweeps over the bundled data files) had not finished after 17 minutes
# while everything else (prefill and decode against the double-precision oracle for every mask
# kind, dtype, GQA group, head dim, split and layout, merge_states, masks, CPU targets) takes about
# 15 s; they add no kernel path the oracle checks miss. So the default skips Fidelity*;
# -DFILTER=* runs everything.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunAarch64Tests: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED FILTER)
  set(FILTER "-Fidelity*")
endif()
if(NOT DEFINED JOBS)
  set(JOBS 2)
endif()
set(sysroot /usr/aarch64-linux-gnu)

find_program(CROSS_CXX aarch64-linux-gnu-g++)
find_program(CROSS_CC aarch64-linux-gnu-gcc)
find_program(QEMU qemu-aarch64)
if(NOT CROSS_CXX OR NOT CROSS_CC OR NOT QEMU OR NOT EXISTS ${sysroot}/lib)
  message("aarch64_tests: SKIPPED: needs aarch64-linux-gnu-g++, aarch64-linux-gnu-gcc, "
          "qemu-aarch64 and ${sysroot} (apt-get install g++-aarch64-linux-gnu qemu-user)")
  return()
endif()
# Eigen's package from the host (header-only; the cross toolchain searches only the sysroot):
# tests/CMakeLists.txt passes the one the main build found. find_package is not scriptable.
if(NOT EIGEN3_DIR)
  find_path(EIGEN3_DIR Eigen3Config.cmake PATHS /usr/share/eigen3/cmake /usr/lib/cmake/eigen3
            /usr/local/share/eigen3/cmake NO_DEFAULT_PATH)
endif()
if(NOT EXISTS ${EIGEN3_DIR}/Eigen3Config.cmake)
  message(FATAL_ERROR "aarch64_tests: Eigen3Config.cmake not found; pass -DEIGEN3_DIR=...")
endif()

set(build ${WORK_DIR}/build)
# The project's own flags for the target: armv8-a, not the host's -march. -Wno-psabi: GCC notes
# that std::pair<float, float> is passed as in GCC < 10.1 no more, which only matters when linking
# objects of such old compilers.
set(args -S ${SOURCE_DIR} -B ${build} -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-Wno-psabi
         -DCMAKE_TOOLCHAIN_FILE=${SOURCE_DIR}/cmake/toolchains/aarch64-linux-gnu.cmake
         -DEigen3_DIR=${EIGEN3_DIR} -DSPARSE_ATTN_NATIVE=OFF -DSPARSE_ATTN_ARCH=armv8-a
         -DSPARSE_ATTN_BUILD_TOOLS=OFF -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF
         -DSPARSE_ATTN_BUILD_EXAMPLES=OFF -DSPARSE_ATTN_INSTALL=OFF
         -DSPARSE_ATTN_PORTABLE_TEST=OFF -DSPARSE_ATTN_SANITIZER_TEST=OFF
         -DSPARSE_ATTN_FUZZ_SMOKE_TEST=OFF -DSPARSE_ATTN_MULTI_ARCH_TEST=OFF
         -DSPARSE_ATTN_AARCH64_TEST=OFF -DSPARSE_ATTN_STRICT_CONSUMER_TEST=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()

set(RUN_STEP_JOB aarch64_tests)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

run_step(configure ${CMAKE_COMMAND} ${args})
run_step(build ${CMAKE_COMMAND} --build ${build} --target test_kernels -j${JOBS})
# Two OpenMP threads: CI has two cores (qemu-user runs guest threads as host threads).
run_step(test_kernels ${CMAKE_COMMAND} -E env OMP_NUM_THREADS=2
         ${QEMU} -L ${sysroot} ${build}/tests/test_kernels --gtest_brief=1 --gtest_filter=${FILTER})
