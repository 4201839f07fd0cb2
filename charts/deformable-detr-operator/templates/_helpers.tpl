{{/* Names, labels and facts shared by the templates. */}}

{{- define "ddetr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ddetr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ddetr.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ddetr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deformable-detr
{{- end -}}

{{/* Labels of the operator's own objects. */}}
{{- define "ddetr.labels" -}}
{{ include "ddetr.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ddetr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ddetr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ddetr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ddetr.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ddetr.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The chart's CRD, parsed: RBAC and monitors take the API group and plural from it, so they
     cannot drift from the CRD the operator serves. */}}
{{- define "ddetr.crd" -}}
{{- $crd := dict -}}
{{- range $path, $_ := .Files.Glob "crds/*.yaml" -}}
{{- $doc := $.Files.Get $path | fromYaml -}}
{{- if eq (get $doc "kind") "CustomResourceDefinition" -}}
{{- $crd = $doc -}}
{{- end -}}
{{- end -}}
{{- if not $crd.spec -}}
{{- fail "the chart's crds/ folder holds no CustomResourceDefinition" -}}
{{- end -}}
{{- toYaml $crd -}}
{{- end -}}

{{/* Namespaces the operator works in: the listed ones, or none (cluster-wide). */}}
{{- define "ddetr.watchNamespaces" -}}
{{- toJson (.Values.watch.namespaces | default list | uniq) -}}
{{- end -}}

{{/* Namespaces that get a trainer ServiceAccount: the release namespace plus the watched ones. */}}
{{- define "ddetr.trainerNamespaces" -}}
{{- toJson (prepend (.Values.watch.namespaces | default list) .Release.Namespace | uniq) -}}
{{- end -}}

{{/* Command-line arguments of the operator (`ddetr-operator --help`, operator/ddetr_operator/__main__.py). */}}
{{- define "ddetr.operatorArgs" -}}
- {{ printf "--liveness=http://0.0.0.0:%d/healthz" (int .Values.operator.healthPort) }}
- {{ printf "--metrics-port=%d" (int .Values.operator.metricsPort) }}
- {{ printf "--reconcile-interval=%v" .Values.operator.reconcileIntervalSeconds }}
- {{ printf "--full-pass-every=%v" .Values.operator.fullPassSeconds }}
{{- range (include "ddetr.watchNamespaces" . | fromJsonArray) }}
- {{ printf "--namespace=%s" . }}
{{- end }}
{{- range .Values.trainer.allowedHostPaths }}
- {{ printf "--allowed-host-path=%s" . }}
{{- end }}
{{- if not (include "ddetr.readsSecrets" .) }}
- --no-read-secrets
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- end -}}

{{/* Non-empty when the operator may `get` Secrets: in namespaced mode (in those namespaces only), or
     cluster-wide when rbac.readSecretsClusterWide says so. */}}
{{- define "ddetr.readsSecrets" -}}
{{- if or (include "ddetr.watchNamespaces" . | fromJsonArray) .Values.rbac.readSecretsClusterWide -}}
true
{{- end -}}
{{- end -}}

{{/* Selects trainer pods: the worker pods the operator renders (ddetr_operator.render). */}}
{{- define "ddetr.trainerPodSelector" -}}
{{- $crd := include "ddetr.crd" . | fromYaml -}}
matchLabels:
  {{ printf "%s/role" $crd.spec.group }}: worker
matchExpressions:
  - key: {{ printf "%s/job-name" $crd.spec.group }}
    operator: Exists
{{- end -}}

{{/* Exactly what the operator calls in the namespaces it serves (operator/ddetr_operator/kube.py and
     leader.py, and kopf's own calls), nothing more:
     - its jobs: kopf lists and watches them; kube.py gets one fresh per pass, deletes it after
       ttlSecondsAfterFinished; patch is kopf's removal of the finalizer older operator versions left;
       status: merge-patched each pass; finalizers: `update` lets it create children with
       blockOwnerDeletion under the OwnerReferencesPermissionEnforcement admission plugin;
     - Services and ConfigMaps: read (exists?) and create, never changed or deleted (garbage collection);
     - Pods: listed (observe) and watched (kopf: a pod's change triggers its job's pass), deleted with
       a failed gang; batch Jobs: the same, plus create and patch (suspend);
     - Secrets: `get` of the S3 credentials Secret a job names (its progress), only when .secrets;
     - events: created (the operator's and kopf's);
     - PodGroups: read (exists?) and created. */}}
{{- define "ddetr.namespacedRules" -}}
- apiGroups: [{{ .crd.spec.group | quote }}]
  resources: [{{ .crd.spec.names.plural | quote }}]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [{{ .crd.spec.group | quote }}]
  resources: [{{ printf "%s/status" .crd.spec.names.plural | quote }}]
  verbs: ["patch"]
- apiGroups: [{{ .crd.spec.group | quote }}]
  resources: [{{ printf "%s/finalizers" .crd.spec.names.plural | quote }}]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
{{- if .secrets }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- if .podGroups }}
- apiGroups: ["scheduling.k8s.io", "scheduling.volcano.sh", "scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "create"]
{{- end -}}
{{- end -}}

{{/* Non-empty when the replicas elect a leader (several replicas, or asked for). */}}
{{- define "ddetr.leaderElection" -}}
{{- if or .Values.operator.leaderElection (gt (int .Values.operator.replicas) 1) }}true{{ end -}}
{{- end -}}
