{{/* Chart name, overridable. */}}
{{- define "pbft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "pbft.fullname" -}}
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

{{/* Name of the controller's Deployment, Service, (Cluster)Role and Lease. */}}
{{- define "pbft.controllerName" -}}
{{- printf "%s-controller" (include "pbft.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pbft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of the chart. */}}
{{- define "pbft.labels" -}}
helm.sh/chart: {{ include "pbft.chart" . }}
app.kubernetes.io/name: {{ include "pbft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pbft
{{- end -}}

{{/* Selector of the controller's pods. Its name label is "<name>-controller", never "pbft":
the controller selects a cluster's replica pods by {name: pbft, instance: <cluster name>},
which would otherwise also match the controller pod when the release and the cluster share
a name (as with the defaults: release "pbft", cluster "pbft"). */}}
{{- define "pbft.controllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "pbft.name" . }}-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "pbft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pbft.controllerName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image, repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "pbft.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespace the controller watches: the release namespace in namespaced mode. */}}
{{- define "pbft.watchNamespace" -}}
{{- if .Values.rbac.namespaced -}}
{{- .Release.Namespace -}}
{{- else -}}
{{- .Values.controller.watchNamespace -}}
{{- end -}}
{{- end -}}

{{- define "pbft.leaseName" -}}
{{- default (include "pbft.controllerName" .) .Values.controller.leaderElection.leaseName -}}
{{- end -}}
