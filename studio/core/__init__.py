"""The ground floor: what every other layer stands on, importing nothing of the studio above it.

Errors, settings read once from the environment, atomic writes of files and folders, the safety check
for weight files, hashing, the third-party quieting, model families, base models (a reference ->
a pipeline that knows its family), single-file checkpoints, and the embedded models' weights.
"""
