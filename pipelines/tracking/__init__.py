"""MLflow: the train and eval jobs' runs (runs.py), the trained model as an MLflow model (model.py,
with entry.py: the code MLflow runs to rebuild it), and the client helpers both use (client.py)."""
