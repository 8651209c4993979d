"""Platform services every layer may use: the stage cache, Ray start-up, MLflow tracking, Ray
metrics, secret redaction, model assets. Imports nothing else from raydapt."""
