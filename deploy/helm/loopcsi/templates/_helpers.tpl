{{/*
Labels of every object: the kustomize base's app.kubernetes.io/part-of, and Helm's own. The base
has no others, so tests/helm/run.sh ignores exactly the Helm ones when it compares the two.
*/}}
{{- define "loopcsi.labels" -}}
app.kubernetes.io/part-of: loopcsi
{{ include "loopcsi.helmLabels" . }}
{{- end }}

{{- define "loopcsi.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/*
The kubelet directory without a trailing slash; every kubelet path of the DaemonSet is built
from it, as components/kubelet-dir rewrites them in the kustomize base.
*/}}
{{- define "loopcsi.kubeletDir" -}}
{{- if eq .Values.kubeletDir "/" -}}
{{- fail "kubeletDir must not be /" -}}
{{- end -}}
{{- trimSuffix "/" .Values.kubeletDir -}}
{{- end }}

{{/* The host directory of the driver's socket, which the kubelet dials. */}}
{{- define "loopcsi.socketDir" -}}
{{ include "loopcsi.kubeletDir" . }}/plugins/{{ .Values.driverName }}
{{- end }}

{{/* IMAGE: "repository:tag" of an image value. */}}
{{- define "loopcsi.image" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{/*
Helm's labels on the node plugin's pods: only those that stay the same across upgrades, so that
a new chart version alone does not restart every node plugin.
*/}}
{{- define "loopcsi.podHelmLabels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
