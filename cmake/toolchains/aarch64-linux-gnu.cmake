# Cross build for 64-bit Arm Linux with Debian's cross toolchain (apt-get install
# g++-aarch64-linux-gnu qemu-user): target libraries (libstdc++, libgomp) come from the cross
# sysroot /usr/aarch64-linux-gnu; binaries run on x86 under qemu-aarch64 (the emulator below, which
# ctest and gtest_discover_tests use). Eigen is header-only, so the host's /usr/include/eigen3 and
# its CMake package serve the target too (cmake/RunAarch64Tests.cmake passes Eigen3_DIR); GoogleTest
# is built from /usr/src/googletest by the cross compiler (tests/CMakeLists.txt's fallback, as the
# host's libgtest is x86 code and the package search below never sees it).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(SPARSE_ATTN_CROSS_PREFIX aarch64-linux-gnu- CACHE STRING "Cross tool prefix")
set(SPARSE_ATTN_CROSS_SYSROOT /usr/aarch64-linux-gnu CACHE PATH "Target libraries (qemu -L too)")
set(CMAKE_C_COMPILER ${SPARSE_ATTN_CROSS_PREFIX}gcc)  # GoogleTest's project enables C
set(CMAKE_CXX_COMPILER ${SPARSE_ATTN_CROSS_PREFIX}g++)

# Libraries, headers and packages from the target tree only; programs (nm, python) from the host.
set(CMAKE_FIND_ROOT_PATH ${SPARSE_ATTN_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${SPARSE_ATTN_CROSS_SYSROOT})
