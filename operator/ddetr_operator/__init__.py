"""Kubernetes operator for DeformableDetrJob: runs Deformable DETR tasks as torchrun gangs."""
from __future__ import annotations

GROUP = "ddetr.dev"
VERSION = "v1alpha1"
KIND = "DeformableDetrJob"
PLURAL = "deformabledetrjobs"
SINGULAR = "deformabledetrjob"
SHORT_NAMES = ["ddj"]
API_VERSION = f"{GROUP}/{VERSION}"

# Labels every child carries, so the operator finds them and users can select them.
LABEL_JOB = f"{GROUP}/job-name"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_ROLE = f"{GROUP}/role"
