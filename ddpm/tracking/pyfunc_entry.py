"""MLflow models-from-code entry of the EMA sampler (`ddpm.tracking.mlflow_model`): MLflow runs this file
when the model loads, so no pickled code is ever stored. Not imported by the package itself."""

from mlflow.models import set_model

from ddpm.tracking.mlflow_model import EmaSampler

set_model(EmaSampler())
