# cmake -DBUILD_DIR=... -DCONSUMER_DIR=... -DWORK_DIR=... [-DCONFIG=...] [-DGENERATOR=...]
#       [-DCXX_COMPILER=...] -P RunInstallConsumer.cmake
# Installs the build tree into WORK_DIR/prefix, then configures, builds and runs the consumer
# project (find_package(sparse_attn CONFIG REQUIRED)) against that prefix only: once as is (the
# package links OpenMP when the consumer finds it; this build found it, so the consumer must print
# "OpenMP on"), once with -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON, a consumer without OpenMP: the
# package must still work, without -fopenmp ("OpenMP off").
foreach(v BUILD_DIR CONSUMER_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunInstallConsumer: ${v} not set")
  endif()
endforeach()

set(RUN_STEP_JOB install_consumer)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

set(prefix ${WORK_DIR}/prefix)
set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})

set(config_args "")
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
run_step(install ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} ${config_args})

foreach(f include/sparse_attn/sparse_attn.hpp include/sparse_attn/io/npy.hpp)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "install_consumer: ${f} missing from the install tree")
  endif()
endforeach()

function(build_and_run label build extra_args expect)
  set(configure_args -S ${CONSUMER_DIR} -B ${build} -DCMAKE_PREFIX_PATH=${prefix}
                     -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON ${extra_args})
  if(GENERATOR)
    list(APPEND configure_args -G ${GENERATOR})
  endif()
  if(CXX_COMPILER)
    list(APPEND configure_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
  endif()
  if(CONFIG)
    list(APPEND configure_args -DCMAKE_BUILD_TYPE=${CONFIG})
  endif()
  run_step("configure${label}" ${CMAKE_COMMAND} ${configure_args})
  run_step("build${label}" ${CMAKE_COMMAND} --build ${build} ${config_args})

  if(EXISTS ${build}/consumer)
    set(exe ${build}/consumer)
  elseif(CONFIG AND EXISTS ${build}/${CONFIG}/consumer)
    set(exe ${build}/${CONFIG}/consumer)
  else()
    message(FATAL_ERROR "install_consumer: consumer executable not found under ${build}")
  endif()
  execute_process(COMMAND ${exe} RESULT_VARIABLE rc OUTPUT_VARIABLE out)
  message(STATUS "${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: step 'run${label}' failed (${rc})")
  endif()
  if(NOT out MATCHES "${expect}")
    message(FATAL_ERROR "install_consumer: expected '${expect}' from ${exe}")
  endif()
endfunction()

build_and_run("" ${build} "" "OpenMP on")
build_and_run(" (no OpenMP)" ${build}-no-openmp -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON "OpenMP off")
message(STATUS "install_consumer: OK")
