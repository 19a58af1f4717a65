"""The runbook: parameters and settings, each step's engine call, the run that executes the
notebooks in order with their kernels, and the manifest that seals its folder."""
