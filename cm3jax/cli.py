"""The shared entry point of cm3jax's `--config=experiments/X.py --workdir=DIR` jobs.

`cm3jax.data.prepare`, `cm3jax.data.inspect` and `cm3jax.retrieval.build` each run one
function of (config, workdir). `run_job` defines the two flags, checks them and turns a
`UserError` into one `error:` line and exit code 2. Call it under
`if __name__ == "__main__":` only: flags defined when such a module is merely imported (the
trainer imports prepare) would clash with the importer's own.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from cm3jax.errors import UserError, exit_on_user_error


def run_job(job: Callable[[ml_collections.ConfigDict, str], None], config_help: str,
            workdir_help: str) -> None:
    """Defines --config and --workdir, then runs `job(config, workdir)` as an absl app."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not flags.FLAGS.workdir:
            raise UserError(f"--workdir ({workdir_help}) is required")
        job(flags.FLAGS.config, flags.FLAGS.workdir)

    app.run(exit_on_user_error(main))
