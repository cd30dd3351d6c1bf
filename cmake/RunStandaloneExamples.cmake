# cmake -DSOURCE_DIR=... -DWORK_DIR=... -DRUNS="name args|name args|..." [-DGENERATOR=...]
#       [-DCXX_COMPILER=...] [-DMARCH=native] -P RunStandaloneExamples.cmake
# Proves that the examples are what an engine author can copy: nothing but the installed package.
#   1. configures SOURCE_DIR in a fresh build directory with tests, tools, benchmarks, examples
#      and docs off, and runs `cmake --install` into WORK_DIR/prefix without building anything
#      (the install needs no built target);
#   2. copies examples/*.cpp, examples/*.hpp and examples/standalone/CMakeLists.txt out of the
#      tree, to WORK_DIR/src;
#   3. configures that project against the prefix alone (Release, -Wall -Wextra -Wpedantic
#      -Werror, -march=MARCH when given), builds every example in it and runs each with its
#      arguments from RUNS (the small sizes examples/CMakeLists.txt gives ctest).
foreach(v SOURCE_DIR WORK_DIR RUNS)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "RunStandaloneExamples: ${v} not set")
  endif()
endforeach()

set(RUN_STEP_JOB standalone_examples)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

set(lib_build ${WORK_DIR}/library-build)
set(prefix ${WORK_DIR}/prefix)
set(src ${WORK_DIR}/src)
set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})

set(generator_args "")
if(GENERATOR)
  set(generator_args -G ${GENERATOR})
endif()
set(compiler_args "")
if(CXX_COMPILER)
  set(compiler_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

# 1. Configure + install, nothing built.
run_step("configure the library" ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${lib_build} ${generator_args}
         ${compiler_args} -DCMAKE_BUILD_TYPE=Release -DSPARSE_ATTN_INSTALL=ON
         -DSPARSE_ATTN_BUILD_TESTS=OFF -DSPARSE_ATTN_BUILD_TOOLS=OFF
         -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF -DSPARSE_ATTN_BUILD_EXAMPLES=OFF
         -DSPARSE_ATTN_BUILD_DOCS=OFF)
run_step("install without building" ${CMAKE_COMMAND} --install ${lib_build} --prefix ${prefix})

# 2. The examples out of the tree.
file(GLOB example_files ${SOURCE_DIR}/examples/*.cpp ${SOURCE_DIR}/examples/*.hpp)
file(COPY ${example_files} ${SOURCE_DIR}/examples/standalone/CMakeLists.txt DESTINATION ${src})

# 3. Configure against the prefix only (the package must come from it), build, run.
set(configure_args -S ${src} -B ${build} ${generator_args} ${compiler_args}
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
    -DEXAMPLES_WERROR=ON)
if(MARCH)
  list(APPEND configure_args -DEXAMPLES_MARCH=${MARCH})
endif()
run_step("configure the examples" ${CMAKE_COMMAND} ${configure_args})
file(STRINGS ${build}/CMakeCache.txt package_dir REGEX "^sparse_attn_DIR:")
string(REGEX REPLACE "^[^=]*=" "" package_dir "${package_dir}")
get_filename_component(real_prefix "${prefix}" REALPATH)
get_filename_component(real_package_dir "${package_dir}" REALPATH)
string(FIND "${real_package_dir}" "${real_prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "standalone_examples: found sparse_attn at '${package_dir}', not in ${prefix}")
endif()
# ... and the headers from the prefix, never from the source tree (Makefile and Ninja generators
# write the compile commands).
if(EXISTS ${build}/compile_commands.json)
  file(READ ${build}/compile_commands.json compile_commands)
  string(FIND "${compile_commands}" "${SOURCE_DIR}/include" at)
  if(NOT at EQUAL -1)
    message(FATAL_ERROR "standalone_examples: the examples' compile commands name ${SOURCE_DIR}/include")
  endif()
endif()
run_step("build the examples" ${CMAKE_COMMAND} --build ${build} --parallel 2)

string(REPLACE "|" ";" runs "${RUNS}")
foreach(run IN LISTS runs)
  separate_arguments(command UNIX_COMMAND "${run}")
  list(POP_FRONT command name)
  string(REPLACE ";" " " shown "${command}")
  run_step("run ${name} ${shown}" ${build}/${name} ${command})
endforeach()
message(STATUS "standalone_examples: OK")
