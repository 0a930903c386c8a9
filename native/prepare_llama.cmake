# Copies the pristine llama.cpp tree into the build directory and applies the
# native/ggml-dysco patch series, each checked before any is applied.
# Inputs: PRISTINE (tree), PATCHED (destination), PATCH_DIR.
file(GLOB patches "${PATCH_DIR}/*.patch")
list(SORT patches)

# redo the copy only when the patch series changed
set(series_hash "")
foreach(p IN LISTS patches)
    file(SHA256 "${p}" h)
    string(APPEND series_hash "${h}")
endforeach()
string(SHA256 series_hash "${series_hash}${PRISTINE}")
set(stamp "${PATCHED}/.dysco-series")
if (EXISTS "${stamp}")
    file(READ "${stamp}" old_hash)
    if (old_hash STREQUAL series_hash)
        return()
    endif()
endif()

find_program(GIT git REQUIRED)
file(REMOVE_RECURSE "${PATCHED}")
file(MAKE_DIRECTORY "${PATCHED}")
# a repository of its own: git apply inside another work tree would skip the paths silently
execute_process(COMMAND "${GIT}" init -q WORKING_DIRECTORY "${PATCHED}" RESULT_VARIABLE rc)
# only what libllama needs: no tools, tests, examples or web UI
foreach(item CMakeLists.txt LICENSE cmake ggml include src vendor common licenses)
    if (EXISTS "${PRISTINE}/${item}")
        file(COPY "${PRISTINE}/${item}" DESTINATION "${PATCHED}")
    endif()
endforeach()

foreach(p IN LISTS patches)
    get_filename_component(name "${p}" NAME)
    execute_process(COMMAND "${GIT}" apply --check "${p}" WORKING_DIRECTORY "${PATCHED}"
                    RESULT_VARIABLE rc ERROR_VARIABLE err)
    if (NOT rc EQUAL 0)
        message(FATAL_ERROR "dysco-edge: patch ${name} does not apply to llama.cpp at ${PRISTINE}:\n${err}")
    endif()
    execute_process(COMMAND "${GIT}" apply "${p}" WORKING_DIRECTORY "${PATCHED}" RESULT_VARIABLE rc ERROR_VARIABLE err)
    if (NOT rc EQUAL 0)
        message(FATAL_ERROR "dysco-edge: applying patch ${name} failed:\n${err}")
    endif()
    message(STATUS "dysco-edge: applied ${name}")
endforeach()
file(WRITE "${stamp}" "${series_hash}")
