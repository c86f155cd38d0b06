"""Registered models: what `leuko register` stores, and how `leuko predict` and `mlflow models serve` use it.

A registered leuko model is an MLflow pyfunc in the models-from-code format:

    MLmodel, python_env.yaml, requirements.txt   MLflow metadata; signature: float32 (-1, C, -1, -1, -1)
                                                  -> pred_label, prob_<class>; params preprocess, voxel_size
    pyfunc_model.py                               the inference code (a copy of leuko/deploy/pyfunc_model.py)
    code/leuko/                                   the leuko package it imports (requirements never name leuko)
    artifacts/weights.safetensors                 the net's state dict: tensors only
    artifacts/model_config.json                   net name and kwargs, classes, preprocessing settings, the
                                                  training data's intensity range (leuko.deploy.intensity),
                                                  temperature (and class biases: leuko.deploy.decisions),
                                                  review threshold and salted hashes of the training
                                                  patients (leuko.deploy.trust)

Trust boundary. Loading a model runs code in two places, and nothing else:
- pyfunc_model.py from the registry, executed as a Python module (that is how MLflow loads
  models-from-code). It imports leuko.nets, leuko.deploy.inputs (leuko.data.preprocess) and
  leuko.training.predictions (older registered models: leuko.nets, leuko.data.preprocess or
  leuko.data.prepare): from the model's code/leuko/ when the
  loading process has not imported leuko yet, else (and for older models) from the installed package.
- leuko itself, from the Python environment that loads the model, when that process imported it first.
The weights are read with safetensors (no pickle), model_config.json with json, and nothing is
unpickled: `leuko predict` loads models with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and refuses
a model stored as a pickle. So trust a registry as far as you trust the people who can write to it:
anyone who can register a version can change the code that runs when it is loaded. Give write access
to the registry (and its artifact store) only to those who may ship code, and pin deployments to a
version (models:/leuko/7) or an alias you control.

`leuko predict` runs a model through ONNX Runtime on the CPU when it can (leuko.deploy.onnx_model): its
net exported once to an ONNX graph (leuko.deploy.graph), kept in a cache keyed by the weights and config,
and used only when it matches PyTorch within 1e-4. A graph is data, not code. `leuko export` writes such a
graph for use outside Python (leuko.deploy.export); `leuko explain` draws what a model looked at
(leuko.deploy.explain).
"""
