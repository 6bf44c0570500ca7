"""The ground every stage stands on: errors, URLs and storage, atomic writes, options, progress, run directories."""

from stillroom.pipelines.core.atomic import write_atomically, write_json
from stillroom.pipelines.core.errors import (
    DataError,
    StillroomError,
    StoreError,
    UsageError,
    error_line,
    from_worker,
)
from stillroom.pipelines.core.options import (
    add_arguments,
    apply_config_file,
    base_type,
    check_options,
    default_from,
    default_of,
    flags_of,
    option,
    options,
)
from stillroom.pipelines.core.progress import PROGRESS_ENV, ProgressBar, progress_bar
from stillroom.pipelines.core.run_directory import RunDirectory
from stillroom.pipelines.core.storage import (
    Location,
    check_url,
    filesystem,
    is_url,
    local_path,
    open_binary,
    version_field,
)

__all__ = [
    "Location",
    "PROGRESS_ENV",
    "ProgressBar",
    "RunDirectory",
    "DataError",
    "StillroomError",
    "StoreError",
    "UsageError",
    "add_arguments",
    "apply_config_file",
    "base_type",
    "check_options",
    "check_url",
    "default_from",
    "default_of",
    "error_line",
    "filesystem",
    "flags_of",
    "from_worker",
    "is_url",
    "local_path",
    "open_binary",
    "option",
    "options",
    "progress_bar",
    "version_field",
    "write_atomically",
    "write_json",
]
