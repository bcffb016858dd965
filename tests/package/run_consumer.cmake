# Configures, builds and runs one consumer project (ctest drives this script with cmake -P).
#   -DSOURCE=<consumer dir> -DBINARY=<build dir> -DGENERATOR=... -DBUILD_TYPE=... -DCXX=... [-DEXTRA=<one -D argument>]
foreach(step configure build run)
  if(step STREQUAL configure)
    set(cmd ${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY} -G ${GENERATOR} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
        -DCMAKE_CXX_COMPILER=${CXX} ${EXTRA})
  elseif(step STREQUAL build)
    set(cmd ${CMAKE_COMMAND} --build ${BINARY})
  else()
    set(cmd ${BINARY}/consumer)
  endif()
  execute_process(COMMAND ${cmd} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer ${SOURCE}: ${step} failed (${rc})")
  endif()
endforeach()
