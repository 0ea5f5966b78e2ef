# attend_add_kernel(<name> GENERATOR <registered generator name> OPERATION <forward|backward>
#                   DEVICE <cpu|cuda|opencl> HEAD_DIM <n|0> [DTYPE <float32|float16|bfloat16>]
#                   [ROWS <n>] TARGETS <halide targets...> [PARAMS <k=v>...])
#
# ROWS: a kernel made for calls with at most n query rows per head (decoding);
# select_kernel prefers it for such calls and never picks it for others.
# Stamps out one kernel variant of a generator (one of attend_generator's, e.g.
# `attention`) as a Halide library that uses the project's one shared Halide
# runtime, and records it for the kernel table the runtime is compiled with
# (attend_kernels.inc) under its operation (attend::Operation, whose kernel
# signature is in include/attend/kernel_abi.hpp). Adding a variant or a target
# is one call or one list entry.
set_property(GLOBAL PROPERTY ATTEND_KERNEL_ENTRIES "")
set_property(GLOBAL PROPERTY ATTEND_KERNEL_LIBRARIES "")

# attend_tuned_params(<halide target> <forward|backward> <head dim> <out var>)
#
# The schedule parameters `attend tune` chose for a CPU target, operation and
# head dim, from ATTEND_TUNING_FILE (JSON: targets.<target>.<entry>.params =
# {knob: value}, where the entry is d<head dim> for the forward and
# backward_d<head dim> for the backward), as a list of knob=value; empty where
# the file has no entry (the generator's defaults: the hand schedule). Editing
# the file re-runs CMake.
function(attend_tuned_params TARGET OPERATION HEAD_DIM OUT)
    set(${OUT} "" PARENT_SCOPE)
    if (NOT ATTEND_TUNING_FILE)
        return ()
    endif ()
    if (NOT EXISTS "${ATTEND_TUNING_FILE}")
        message(FATAL_ERROR "ATTEND_TUNING_FILE: ${ATTEND_TUNING_FILE} does not exist (empty: use the hand schedule)")
    endif ()
    set_property(DIRECTORY "${PROJECT_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${ATTEND_TUNING_FILE}")
    file(READ "${ATTEND_TUNING_FILE}" json)
    set(entry "d${HEAD_DIM}")
    if (OPERATION STREQUAL "backward")
        set(entry "backward_d${HEAD_DIM}")
    endif ()
    string(JSON params ERROR_VARIABLE missing GET "${json}" targets "${TARGET}" "${entry}" params)
    if (missing)
        return ()
    endif ()
    string(JSON count LENGTH "${params}")
    set(result "")
    if (count GREATER 0)
        math(EXPR last "${count} - 1")
        foreach (index RANGE ${last})
            string(JSON knob MEMBER "${params}" ${index})
            string(JSON value GET "${params}" "${knob}")
            string(JSON type TYPE "${params}" "${knob}")
            if (type STREQUAL "BOOLEAN")  # CMake reads JSON's true as ON; a GeneratorParam<bool> wants true
                if (value)
                    set(value true)
                else ()
                    set(value false)
                endif ()
            endif ()
            list(APPEND result "${knob}=${value}")
        endforeach ()
    endif ()
    set(${OUT} "${result}" PARENT_SCOPE)
endfunction()

# attend_target_isa(<halide target> <out var>): the CPU level a target is built
# for, as the runtime names it (AVX512, AVX2 or Baseline).
function(attend_target_isa HALIDE_TARGET OUT)
    if (HALIDE_TARGET MATCHES "avx512")
        set(${OUT} AVX512 PARENT_SCOPE)
    elseif (HALIDE_TARGET MATCHES "avx2")
        set(${OUT} AVX2 PARENT_SCOPE)
    else ()
        set(${OUT} Baseline PARENT_SCOPE)
    endif ()
endfunction()

function(attend_add_kernel NAME)
    cmake_parse_arguments(PARSE_ARGV 1 ARG "" "GENERATOR;OPERATION;DEVICE;HEAD_DIM;DTYPE;ROWS" "TARGETS;PARAMS")
    if (NOT ARG_ROWS)
        set(ARG_ROWS 0)
    elseif (NOT ARG_ROWS MATCHES "^[1-9][0-9]*$")
        message(FATAL_ERROR "attend_add_kernel(${NAME}): ROWS must be a positive number, got '${ARG_ROWS}'")
    endif ()
    if (NOT ARG_GENERATOR)
        message(FATAL_ERROR "attend_add_kernel(${NAME}): GENERATOR (a generator of attend_generator) is required")
    endif ()
    # The operation as attend::Operation spells it (forward -> Forward); each has
    # its signature in include/attend/kernel_abi.hpp.
    set(operations forward backward)
    if (NOT ARG_OPERATION IN_LIST operations)
        message(FATAL_ERROR "attend_add_kernel(${NAME}): OPERATION must be one of ${operations} "
                            "(attend::Operation), got '${ARG_OPERATION}'")
    endif ()
    if (NOT ARG_TARGETS)
        message(FATAL_ERROR "attend_add_kernel(${NAME}): TARGETS (Halide targets) is required")
    endif ()
    string(SUBSTRING "${ARG_OPERATION}" 0 1 first)
    string(SUBSTRING "${ARG_OPERATION}" 1 -1 rest)
    string(TOUPPER "${first}" first)
    set(operation "${first}${rest}")
    if (NOT ARG_DEVICE MATCHES "^(cpu|cuda|opencl)$")
        message(FATAL_ERROR "attend_add_kernel(${NAME}): DEVICE must be cpu, cuda or opencl, got '${ARG_DEVICE}'")
    endif ()
    if (NOT ARG_DTYPE)
        set(ARG_DTYPE float32)
    endif ()
    set(dtype_names float32 Float32 float16 Float16 bfloat16 BFloat16)
    list(FIND dtype_names "${ARG_DTYPE}" at)
    if (at LESS 0 OR NOT ARG_DTYPE MATCHES "^(float32|float16|bfloat16)$")
        message(FATAL_ERROR "attend_add_kernel(${NAME}): DTYPE must be float32, float16 or bfloat16, got '${ARG_DTYPE}'")
    endif ()
    math(EXPR at "${at} + 1")
    list(GET dtype_names ${at} dtype)
    # ATTEND_AUTOSCHEDULER: Anderson2021 schedules the CUDA kernels (it is
    # GPU-only), the others the CPU kernels; the rest keep their schedules.
    set(scheduler_args "")
    if (ATTEND_AUTOSCHEDULER STREQUAL "Anderson2021" AND ARG_DEVICE STREQUAL "cuda")
        set(scheduler_args AUTOSCHEDULER Halide::Anderson2021)
    elseif (ATTEND_AUTOSCHEDULER AND NOT ATTEND_AUTOSCHEDULER STREQUAL "Anderson2021" AND ARG_DEVICE STREQUAL "cpu")
        set(scheduler_args AUTOSCHEDULER "Halide::${ATTEND_AUTOSCHEDULER}")
    endif ()
    set(device_names cpu CPU cuda CUDA opencl OpenCL)
    list(FIND device_names "${ARG_DEVICE}" at)
    math(EXPR at "${at} + 1")
    list(GET device_names ${at} device)
    # A GPU kernel is one library for its one target. A CPU kernel is one library
    # per target (<name>_avx512, <name>_avx2, <name>_baseline), each with its own
    # schedule parameters from the tuning file, and the runtime calls the best
    # target the CPU runs (Halide's multi-target wrapper takes one PARAMS for all).
    set(libraries "")
    set(by_isa "")
    set(single_function ${NAME})
    foreach (target IN LISTS ARG_TARGETS)
        set(library ${NAME})
        set(params ${ARG_PARAMS})
        if (ARG_DEVICE STREQUAL "cpu")
            set(single_function nullptr)
            attend_target_isa("${target}" isa)
            string(TOLOWER "${isa}" suffix)
            set(library ${NAME}_${suffix})
            if (library IN_LIST libraries)
                message(FATAL_ERROR "attend_add_kernel(${NAME}): two targets of the ${isa} level in '${ARG_TARGETS}'")
            endif ()
            string(APPEND by_isa " ATTEND_ISA(${isa}, ${library})")
            set(tuned "")
            if (ARG_ROWS EQUAL 0)  # the tuning file has no decode kernels' knobs
                attend_tuned_params("${target}" ${ARG_OPERATION} ${ARG_HEAD_DIM} tuned)
            endif ()
            foreach (param IN LISTS ARG_PARAMS)  # explicit PARAMS win over tuned ones
                string(REGEX REPLACE "=.*" "" knob "${param}")
                list(FILTER tuned EXCLUDE REGEX "^${knob}=")
            endforeach ()
            list(PREPEND params ${tuned})
        endif ()
        list(APPEND libraries ${library})
        # user_context: Halide errors reach the handler of the call that raised them.
        add_halide_library(${library}
            FROM ${ATTEND_GENERATOR}
            DEPENDS ${ATTEND_GENERATOR_DEPENDS}
            GENERATOR ${ARG_GENERATOR}
            FUNCTION_NAME ${library}
            USE_RUNTIME attend_halide_runtime
            TARGETS ${target}-user_context${ATTEND_HALIDE_FEATURES}
            PARAMS head_dim=${ARG_HEAD_DIM} element_type=${ARG_DTYPE} ${params}
            ${scheduler_args})
    endforeach ()
    list(GET libraries 0 first_library)  # whose metadata gives the kernel's element storage type
    set_property(GLOBAL APPEND_STRING PROPERTY ATTEND_KERNEL_ENTRIES
                 "ATTEND_KERNEL(${NAME}, ${operation}, ${device}, ${ARG_HEAD_DIM}, ${dtype}, ${ARG_ROWS}, ${single_function}, ${first_library}_metadata,${by_isa})\n")
    set_property(GLOBAL APPEND PROPERTY ATTEND_KERNEL_LIBRARIES ${libraries})
endfunction()

# Writes the kernel table: the kernel headers, and one ATTEND_KERNEL(name,
# operation, device, head dim, dtype, rows, single function, metadata,
# ATTEND_ISA(isa, function)...) per variant (runtime/kernel_table.cpp reads it).
function(attend_write_kernel_table FILE)
    get_property(entries GLOBAL PROPERTY ATTEND_KERNEL_ENTRIES)
    get_property(libraries GLOBAL PROPERTY ATTEND_KERNEL_LIBRARIES)
    set(content "// Generated by CMake (attend_add_kernel): the kernels of this build.\n")
    foreach (library IN LISTS libraries)
        string(APPEND content "#include \"${library}.h\"\n")
    endforeach ()
    string(APPEND content "#define ATTEND_KERNEL_TABLE \\\n")
    string(REPLACE "\n" " \\\n" entries "${entries}")
    string(APPEND content "${entries}\n")
    file(CONFIGURE OUTPUT "${FILE}" CONTENT "${content}" @ONLY)
endfunction()
