# Installs this build into a fresh prefix, then configures, builds and runs the
# consumer example against it with find_package(Attend), as a user would.
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")

function(step)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
    if (NOT result EQUAL 0)
        message(FATAL_ERROR "failed (${result}): ${ARGN}")
    endif ()
endfunction()

step("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
step("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
     "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_BUILD_TYPE=Release)
step("${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
step("${WORK_DIR}/build/consumer")

# The dist component, when this build has it: the ring example, on one rank (MPI's singleton).
if (EXISTS "${prefix}/lib/cmake/Attend/Attend-dist-targets.cmake" OR
    EXISTS "${prefix}/lib64/cmake/Attend/Attend-dist-targets.cmake")
    step("${CMAKE_COMMAND}" -S "${SOURCE_DIR}/../ring" -B "${WORK_DIR}/ring" -G "${GENERATOR}"
         "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_BUILD_TYPE=Release)
    step("${CMAKE_COMMAND}" --build "${WORK_DIR}/ring")
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT} 1)
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM} 1)
    step("${WORK_DIR}/ring/ring")
endif ()

# A component the install does not have is an error that names it.
file(WRITE "${WORK_DIR}/missing/CMakeLists.txt"
     "cmake_minimum_required(VERSION 3.28)\nproject(missing CXX)\nfind_package(Attend REQUIRED COMPONENTS nosuch)\n")
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${WORK_DIR}/missing" -B "${WORK_DIR}/missing/build" -G "${GENERATOR}"
                        "-DCMAKE_PREFIX_PATH=${prefix}"
                RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if (result EQUAL 0 OR NOT output MATCHES "no component 'nosuch'")
    message(FATAL_ERROR "find_package(Attend COMPONENTS nosuch) should fail naming the component; got (${result}):\n${output}")
endif ()

# libattend exports its API and the Halide runtime (the tuner's candidates link
# against it), nothing else: no internals, no kernel functions.
file(GLOB library "${prefix}/lib*/libattend.so")
execute_process(COMMAND "${NM}" -D --defined-only -C ${library} OUTPUT_VARIABLE symbols RESULT_VARIABLE result)
if (NOT result EQUAL 0 OR NOT library)
    message(FATAL_ERROR "nm -D failed on '${library}'")
endif ()
string(REGEX MATCHALL "[^\n]+" lines "${symbols}")
set(exported_api FALSE)
set(exported_runtime FALSE)
foreach (line IN LISTS lines)
    string(REGEX REPLACE "^[0-9a-f]* *[A-Za-z] " "" symbol "${line}")
    if (symbol MATCHES "^attend::forward\\(")
        set(exported_api TRUE)
    elseif (symbol MATCHES "^halide_malloc$")
        set(exported_runtime TRUE)
    endif ()
    if (symbol MATCHES "attend::detail|^attend_|Halide::Runtime::Internal")
        message(FATAL_ERROR "libattend exports an internal symbol: ${symbol}")
    endif ()
endforeach ()
if (NOT exported_api OR NOT exported_runtime)
    message(FATAL_ERROR "libattend should export attend::forward and halide_malloc (api: ${exported_api}, "
                        "runtime: ${exported_runtime})")
endif ()
