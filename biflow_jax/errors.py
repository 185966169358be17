"""The errors a user can cause (bad config, data, workdir or weights), reported without a traceback."""

from biflow_jax.config_checks import ConfigError
from biflow_jax.data.input_pipeline import DataError
from biflow_jax.train import TrainingError

EXPECTED_ERRORS = (ConfigError, DataError, TrainingError, FileNotFoundError, FileExistsError, ValueError,
                   KeyError)
