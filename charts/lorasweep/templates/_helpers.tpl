{{/* Names and labels shared by every template. */}}

{{/* The chart's name (nameOverride wins). */}}
{{- define "lorasweep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Base name of the release's objects: the release name, prefixed with the chart's name
unless it already contains it (fullnameOverride wins). Truncated to 63 characters because
some Kubernetes name fields are DNS labels. */}}
{{- define "lorasweep.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorasweep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; `component` is operator or mlflow. */}}
{{- define "lorasweep.labels" -}}
helm.sh/chart: {{ include "lorasweep.chart" .root }}
{{ include "lorasweep.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: lorasweep
{{- end }}

{{/* Labels that select a component's pods (stable across upgrades). */}}
{{- define "lorasweep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorasweep.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lorasweep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorasweep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lorasweep.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "lorasweep.mlflowName" -}}
{{- printf "%s-mlflow" (include "lorasweep.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The tracking URI sweeps inherit: trialDefaults.mlflowTrackingUri, else the bundled
server's Service when mlflow.enabled, else none. */}}
{{- define "lorasweep.trackingUri" -}}
{{- if .Values.trialDefaults.mlflowTrackingUri }}
{{- .Values.trialDefaults.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "lorasweep.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}
{{- end }}

{{/* The peering object's name, used only with replicas > 1. */}}
{{- define "lorasweep.peeringName" -}}
{{- include "lorasweep.fullname" . }}
{{- end }}

{{/* What the operator does in a namespace it watches; the same rules in a ClusterRole
(all namespaces) or in one Role per listed namespace. */}}
{{- define "lorasweep.namespacedRules" -}}
# Sweeps: kopf watches them and patches them (finalizer, progress annotations); the operator
# writes their status.
- apiGroups: [lorasweep.io]
  resources: [hyperparametersweeps]
  verbs: [list, watch, patch]
- apiGroups: [lorasweep.io]
  resources: [hyperparametersweeps/status]
  verbs: [patch]
# Trials are Jobs: watched through an index, created, and suspended (patch) when stopped
# early; read (get) when a creation finds the name taken, for whose Job holds it. Never
# deleted by the operator: they are owned by their sweep, so garbage collection deletes them
# with it.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# The sweep's report (best_config.yaml, trials_summary.csv) in a ConfigMap `<sweep>-report`:
# written, never read, so no other ConfigMap's content is visible to the operator.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
# Pods only for their termination message (the trial's result); never created or exec'd.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# A headless Service per sweep with multi-node trials, for their pods' DNS names (the
# rendezvous); owned by the sweep, so garbage collection deletes it.
- apiGroups: [""]
  resources: [services]
  verbs: [create]
# Events on sweeps (trial started, succeeded, new best).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Kueue (sweeps with spec.trainer.queueName): a stopped trial's Workload is deactivated
# (list by its Job's uid, patch spec.active), so that Kueue frees its quota and never admits
# it again; the Workloads of queued trials are read for why they wait, and their LocalQueue
# for its ClusterQueue. Harmless where Kueue is not installed.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [localqueues]
  verbs: [get]
{{- end }}
