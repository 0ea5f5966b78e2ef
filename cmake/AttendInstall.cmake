# Install and export, so that find_package(Attend [COMPONENTS ...]) works from an
# install and from the build tree. Each component has its own export set and
# targets file (Attend-<component>-targets.cmake); AttendConfig.cmake loads the
# ones asked for. Components: core (attend::attend, its headers, the attend
# program), always loaded; dist (attend::dist). A later component calls
# attend_install_component(<component> <targets...>).
include(CMakePackageConfigHelpers)
set(ATTEND_CONFIG_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/Attend")

# attend_install_component(<component> <targets...>): installs the targets
# (libraries to lib, programs to bin) under the component, with their export set.
function(attend_install_component COMPONENT)
    set(export_set "Attend-${COMPONENT}")
    install(TARGETS ${ARGN} EXPORT ${export_set} COMPONENT ${COMPONENT}
            LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
            ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}"
            RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
    install(EXPORT ${export_set} NAMESPACE attend:: FILE "${export_set}-targets.cmake"
            DESTINATION "${ATTEND_CONFIG_DIR}" COMPONENT ${COMPONENT})
    export(EXPORT ${export_set} NAMESPACE attend:: FILE "${PROJECT_BINARY_DIR}/${export_set}-targets.cmake")
endfunction()

# core: libattend with its public headers (and the two Halide runtime headers
# they include), and the attend program when it is built.
set(core_targets attend)
if (TARGET attend_cli)
    list(APPEND core_targets attend_cli)
endif ()
attend_install_component(core ${core_targets})
# dist: attend::dist (ring attention over MPI), when it was built.
if (TARGET attend_dist)
    attend_install_component(dist attend_dist)
endif ()
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/attend" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}" COMPONENT core)
install(FILES "${ATTEND_HALIDE_RUNTIME_INCLUDE}/HalideBuffer.h" "${ATTEND_HALIDE_RUNTIME_INCLUDE}/HalideRuntime.h"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/attend/halide" COMPONENT core)

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/AttendConfig.cmake.in"
                              "${PROJECT_BINARY_DIR}/AttendConfig.cmake" INSTALL_DESTINATION "${ATTEND_CONFIG_DIR}")
# 0.x: only the same minor version is compatible (it may break the ABI).
write_basic_package_version_file("${PROJECT_BINARY_DIR}/AttendConfigVersion.cmake" COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/AttendConfig.cmake" "${PROJECT_BINARY_DIR}/AttendConfigVersion.cmake"
        DESTINATION "${ATTEND_CONFIG_DIR}" COMPONENT core)
