{{/* vim: set filetype=mustache: */}}

{{/* The chart name, overridable. */}}
{{- define "dptr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's objects' name: <release>-dptr, or the release name if it holds "dptr". */}}
{{- define "dptr.fullname" -}}
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

{{- define "dptr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "dptr.labels" -}}
helm.sh/chart: {{ include "dptr.chart" . }}
app.kubernetes.io/name: {{ include "dptr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dptr
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of the operator pods. */}}
{{- define "dptr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dptr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dptr.operatorLabels" -}}
{{ include "dptr.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dptr.sidecarLabels" -}}
{{ include "dptr.labels" . }}
app.kubernetes.io/component: sidecar
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "dptr.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "dptr.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; the tag defaults to the appVersion. */}}
{{- define "dptr.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves, as a JSON list ([] with allNamespaces). */}}
{{- define "dptr.watchNamespaces" -}}
{{- if .Values.operator.watch.allNamespaces -}}
[]
{{- else if .Values.operator.watch.namespaces -}}
{{- .Values.operator.watch.namespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* The namespaces that get the sidecar's ServiceAccount and Role, as a JSON list. */}}
{{- define "dptr.sidecarNamespaces" -}}
{{- if .Values.sidecar.namespaces -}}
{{- .Values.sidecar.namespaces | uniq | toJson -}}
{{- else if .Values.operator.watch.allNamespaces -}}
{{- list .Release.Namespace | toJson -}}
{{- else -}}
{{- include "dptr.watchNamespaces" . -}}
{{- end -}}
{{- end -}}

{{/* The operator's rules in a served namespace (files/operator-rules.yaml), plus get on the
     configured credentials Secrets by name. */}}
{{- define "dptr.operatorRules" -}}
{{ .Files.Get "files/operator-rules.yaml" }}
{{- with .Values.operator.credentialsSecretNames }}
# get: the static AWS keys of TaskRunners with credentials.mode Secret, read by name only
#      (operator.credentialsSecretNames); never list or watch, no other Secret.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: {{ toJson (uniq .) }}
  verbs: ["get"]
{{- end }}
{{- end -}}
