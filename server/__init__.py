"""The HTTP server. mlx_lm is imported here first, so that it cannot lower the process's
open-files limit (see fdlimit.py)."""

from mlxserve.server.http.fdlimit import import_mlx_lm_keeping_fd_limit

import_mlx_lm_keeping_fd_limit()
