"""The local Kubernetes the tests and developers run: a control plane built from Kubernetes' own Go
modules (this folder's go.mod), KWOK nodes and a pod runner. `python -m ddetr_localcluster serve`."""
