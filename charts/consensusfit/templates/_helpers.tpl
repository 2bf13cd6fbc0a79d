{{/* Names, labels and the runner defaults shared by the templates. */}}

{{- define "consensusfit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "consensusfit.fullname" -}}
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

{{- define "consensusfit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consensusfit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "consensusfit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "consensusfit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: consensusfit
{{- end -}}

{{- define "consensusfit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "consensusfit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "consensusfit.runnerServiceAccountName" -}}
{{- default (printf "%s-runner" (include "consensusfit.fullname" .)) .Values.runner.serviceAccount.name -}}
{{- end -}}

{{/* Where runner ServiceAccounts go: every watched namespace, or the release namespace. */}}
{{- define "consensusfit.runnerNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "consensusfit.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "consensusfit.runnerImage" -}}
{{- printf "%s:%s" .Values.runner.image.repository (default .Chart.AppVersion .Values.runner.image.tag) -}}
{{- end -}}

{{/*
CONSENSUSFIT_RUNNER_DEFAULTS: spec.runner defaults for every fit, merged under the fit's own
spec.runner by the operator (operator/children.py runner_settings): the runner values that are set,
and `steps`, the per-step values that are set (a step's settings as given). The runner
ServiceAccount is a default only when the operator watches listed namespaces, since a
ServiceAccount exists per namespace and a pod naming an absent one is never created.
*/}}
{{- define "consensusfit.runnerDefaults" -}}
{{- $r := .Values.runner -}}
{{- $d := dict "resources" $r.resources -}}
{{- range $key := list "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" "priorityClassName" "runtimeClassName" "schedulerName" "imagePullSecrets" "labels" "podLabels" "podAnnotations" "volumes" "volumeMounts" "podSecurityContext" "compilationCache" -}}
{{- with index $r $key }}{{ $_ := set $d $key . }}{{ end -}}
{{- end -}}
{{- $steps := dict -}}
{{- range $step, $settings := $r.steps -}}
{{- with $settings }}{{ $_ := set $steps $step . }}{{ end -}}
{{- end -}}
{{- with $steps }}{{ $_ := set $d "steps" . }}{{ end -}}
{{- $env := list -}}
{{- with $r.s3.endpoint }}{{ $env = append $env (dict "name" "AWS_ENDPOINT_URL" "value" .) }}{{ end -}}
{{- with $r.s3.region }}{{ $env = append $env (dict "name" "AWS_REGION" "value" .) }}{{ end -}}
{{- $env = concat $env $r.env -}}
{{- if $env }}{{ $_ := set $d "env" $env }}{{ end -}}
{{- $envFrom := list -}}
{{- with $r.s3.credentialsSecret }}{{ $envFrom = append $envFrom (dict "secretRef" (dict "name" .)) }}{{ end -}}
{{- $envFrom = concat $envFrom $r.envFrom -}}
{{- if $envFrom }}{{ $_ := set $d "envFrom" $envFrom }}{{ end -}}
{{- if and .Values.watchNamespaces $r.serviceAccount.create -}}
{{- $_ := set $d "serviceAccountName" (include "consensusfit.runnerServiceAccountName" .) -}}
{{- end -}}
{{- toJson $d -}}
{{- end -}}
