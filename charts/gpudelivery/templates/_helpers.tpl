{{/* The name every object of a release starts with. */}}
{{- define "gpudelivery.fullname" -}}
{{- printf "%s-gpudelivery" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "gpudelivery.labels" -}}
app.kubernetes.io/name: gpudelivery
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gpudelivery.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The labels that select the operator's pods (Deployment, webhook Service, budget). */}}
{{- define "gpudelivery.operatorSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The Service in front of every operator replica's admission webhook. */}}
{{- define "gpudelivery.webhookServiceName" -}}
{{- printf "%s-webhook" (include "gpudelivery.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The host name the API server calls the webhook at, which its certificate names. */}}
{{- define "gpudelivery.webhookServiceHost" -}}
{{- printf "%s.%s.svc" (include "gpudelivery.webhookServiceName" .) .Release.Namespace -}}
{{- end -}}

{{/* The webhook's TLS Secret: the one given in operator.webhook.certSecret, else the
chart's own. */}}
{{- define "gpudelivery.webhookSecretName" -}}
{{- $generated := printf "%s-webhook-tls" (include "gpudelivery.fullname" .) -}}
{{- .Values.operator.webhook.certSecret | default ($generated | trunc 63 | trimSuffix "-") -}}
{{- end -}}
