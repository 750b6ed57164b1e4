{{/* Labels every object carries. */}}
{{- define "eni-monitor.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels that select the agent's pods; fixed for the life of a release. */}}
{{- define "eni-monitor.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "eni-monitor.fullname" -}}
{{- if eq .Release.Name .Chart.Name }}{{ .Chart.Name }}{{ else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end }}

{{/* The probes' scheme: HTTPS when the endpoints are served over TLS. */}}
{{- define "eni-monitor.probeScheme" -}}
{{- if .Values.webConfig.secretName }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}
