"""The ExApp frontends: one root resource, the decision pipeline, the proxy."""
