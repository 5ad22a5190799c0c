"""The code MLflow runs to rebuild a logged samsr model (MLflow "models from code"): nothing pickled."""
import mlflow.models

from pipelines.tracking.model import SamsrPyfunc

mlflow.models.set_model(SamsrPyfunc())
