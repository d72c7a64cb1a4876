{{/* The chart name, overridable. */}}
{{- define "flatwire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Base of every object name: the release name, plus the chart name unless it has it. */}}
{{- define "flatwire.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "flatwire.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flatwire.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flatwire.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flatwire
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "flatwire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flatwire.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image reference; call with (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "flatwire.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "flatwire.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "flatwire.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "flatwire.agentServiceAccount" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "flatwire.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A CRD from files/crds/ (a byte-identical copy of the repository's generated crds/; a test
checks it), with helm.sh/resource-policy: keep added under its top-level metadata.
Call with (dict "ctx" $ "file" "networks.flatwire.io.yaml").
*/}}
{{- define "flatwire.crd" -}}
{{- $path := printf "files/crds/%s" .file -}}
{{- $crd := .ctx.Files.Get $path -}}
{{- if not $crd -}}
{{- fail (printf "the chart has no %s (copy it from the repository's crds/)" $path) -}}
{{- end -}}
{{- if not (contains "\nmetadata:\n" $crd) -}}
{{- fail (printf "%s has no top-level metadata" $path) -}}
{{- end -}}
{{- if .ctx.Values.crds.keep -}}
{{- $crd = replace "\nmetadata:\n" "\nmetadata:\n  annotations:\n    helm.sh/resource-policy: keep\n" $crd -}}
{{- end -}}
{{- $crd -}}
{{- end -}}
