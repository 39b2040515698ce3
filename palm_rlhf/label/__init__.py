"""`palm-rlhf label`: a local web page where a person ranks, rates or A/B-compares samples.

The page writes exactly the records `palm-rlhf reward` reads. Modules, one job each:
config (the options), items (item ids and background generation), store (the append-only
label file), modes (what a valid label is, and the record it becomes), session (leases, undo,
progress), security (token, Host/Origin and body checks), app (the routes), backend (the
model: the one module that imports the rest of the package) and stage (`run_label`).
Starlette and uvicorn come with the optional extra: `pip install "palm-rlhf[label]"`.
"""
