{{- define "thynapse.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "thynapse.labels" -}}
app.kubernetes.io/name: thynapse-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "thynapse.selectorLabels" -}}
app.kubernetes.io/name: thynapse-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "thynapse.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "thynapse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default (include "thynapse.fullname" .) .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "thynapse.generatedCert" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.tls.secretName) -}}true{{- end -}}
{{- end -}}
