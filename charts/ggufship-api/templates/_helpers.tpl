{{/* Names, labels and shared fragments of the ggufship-api chart. */}}

{{- define "ggufship-api.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ggufship-api.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ggufship-api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ggufship-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ggufship-api.labels" -}}
{{ include "ggufship-api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
ggufship.io/model: {{ .Values.model.name | quote }}
{{- end -}}

{{- define "ggufship-api.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The API pods: selector labels + component=api. Every API Service, the PDB, the
DestinationRule subsets and the Rollout select on it, so the gate's pods (component=ks-gate)
are never endpoints of the API nor scraped as the API. */}}
{{- define "ggufship-api.apiSelectorLabels" -}}
{{ include "ggufship-api.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end -}}

{{/* Seconds of a duration such as 90s, 5m, 1h. */}}
{{- define "ggufship-api.seconds" -}}
{{- $n := regexFind "^[0-9]+" . | int -}}
{{- $unit := regexFind "[smh]$" . -}}
{{- if eq $unit "h" }}{{ mul $n 3600 }}{{ else if eq $unit "m" }}{{ mul $n 60 }}{{ else }}{{ $n }}{{ end -}}
{{- end -}}

{{/* The analysis args every AnalysisTemplate of this chart takes: the tracks are the
pod-template hashes of the stable and the latest ReplicaSet (argo-rollouts
utils/analysis/factory.go BuildArgumentsForRolloutAnalysisRun), which Prometheus attaches
to every series (ServiceMonitor relabeling), never a label the app reads at start-up. */}}
{{- define "ggufship-api.analysisArgs" -}}
- name: model
  value: {{ .Values.model.name | quote }}
- name: namespace
  value: {{ .Release.Namespace | quote }}
- name: stable-hash
  valueFrom: {podTemplateHashValue: Stable}
- name: canary-hash
  valueFrom: {podTemplateHashValue: Latest}
{{- end -}}

{{- define "ggufship-api.analysisArgNames" -}}
- name: model
- name: namespace
- name: stable-hash
- name: canary-hash
{{- end -}}

{{- define "ggufship-api.validate" -}}
{{- $routing := .Values.rollout.trafficRouting -}}
{{- if not (has $routing (list "none" "nginx" "istio")) -}}
{{- fail (printf "rollout.trafficRouting: %q is not one of none, nginx, istio" $routing) -}}
{{- end -}}
{{- if not (has .Values.analysis.ks.provider (list "job" "web")) -}}
{{- fail (printf "analysis.ks.provider: %q is not one of job, web" .Values.analysis.ks.provider) -}}
{{- end -}}
{{- if not (regexMatch "^[0-9a-f]{64}$" .Values.model.sha256) -}}
{{- fail (printf "model.sha256: %q is not a 64-digit lowercase hex SHA256" .Values.model.sha256) -}}
{{- end -}}
{{- if not (regexMatch "^(s3|oci)://" (default "" .Values.model.uri)) -}}
{{- fail (printf "model.uri: %q must start with s3:// or oci://" (default "" .Values.model.uri)) -}}
{{- end -}}
{{- with .Values.oci.caBundle -}}
{{- if and .configMap .secret -}}
{{- fail (printf "oci.caBundle: configMap %q and secret %q are both set; give the registry's CA bundle in one of them" .configMap .secret) -}}
{{- end -}}
{{- end -}}
{{- $prev := 0 -}}
{{- range $i, $step := .Values.rollout.canary.steps -}}
{{- if le (int $step.weight) (int $prev) -}}
{{- fail (printf "rollout.canary.steps[%d].weight: %v must be above the previous step's %v" $i $step.weight $prev) -}}
{{- end -}}
{{- $prev = $step.weight -}}
{{- end -}}
{{- $a := .Values.analysis -}}
{{- $window := include "ggufship-api.seconds" $a.window | int -}}
{{- if lt (include "ggufship-api.seconds" $a.initialDelay | int) $window -}}
{{- fail (printf "analysis.initialDelay: %s is shorter than analysis.window %s (the first measurement would see less than a window of canary traffic)" $a.initialDelay $a.window) -}}
{{- end -}}
{{- if ge (add (int $a.failureLimit) (int $a.inconclusiveLimit)) (int $a.count) -}}
{{- fail (printf "analysis.failureLimit (%v) + analysis.inconclusiveLimit (%v) must be below analysis.count (%v): else `count` measurements without one success (no data) could end Successful" $a.failureLimit $a.inconclusiveLimit $a.count) -}}
{{- end -}}
{{- end -}}

{{/* `ggufship gate` options shared by the job provider and the gate server. The tracks are
selected by pod-template hash (label rollouts_pod_template_hash, attached by the
ServiceMonitor) and namespace. The whole-request p99 and the 5xx ratio are Prometheus
metrics of their own (analysis.thresholds); the KS gate only gets them when their action
is abort and they are enabled — otherwise a limit no answer reaches (p99 3600 s, 5xx 1),
so that a `pause` threshold never aborts through the gate. */}}
{{- define "ggufship-api.gateArgs" -}}
{{- $a := .Values.analysis -}}
{{- $t := $a.thresholds -}}
- gate
{{- if eq $a.ks.provider "web" }}
- serve
- --host
- 0.0.0.0
- --port
- {{ $a.ks.web.port | quote }}
{{- end }}
- --prometheus
- {{ $a.prometheus.address | quote }}
- --window
- {{ $a.window | quote }}
- --namespace
- {{ .Release.Namespace | quote }}
- --track-label
- rollouts_pod_template_hash
- --analyses
- {{ len .Values.rollout.canary.steps | quote }}
- --min-samples
- {{ $a.minSamples | quote }}
- --max-p99
- {{ if and $t.p99Latency.enabled (eq $t.p99Latency.action "abort") }}{{ $t.p99Latency.maxSeconds | quote }}{{ else }}"3600"{{ end }}
- --max-error-ratio
- {{ if and $t.errorRatio.enabled (eq $t.errorRatio.action "abort") }}{{ $t.errorRatio.max | quote }}{{ else }}"1"{{ end }}
- --metrics
- {{ join "," $a.ks.metrics | quote }}
- --rates
- {{ join "," $a.ks.rates | quote }}
- --min-rate-increase
- {{ $a.ks.minRateIncrease | quote }}
{{- end -}}

{{/* Timing and limits of every counted measurement of the canary plan. */}}
{{- define "ggufship-api.metricTiming" -}}
{{- $a := .Values.analysis -}}
initialDelay: {{ $a.initialDelay }}
interval: {{ $a.interval }}
count: {{ $a.count }}
failureLimit: {{ $a.failureLimit }}
inconclusiveLimit: {{ $a.inconclusiveLimit }}
consecutiveErrorLimit: {{ $a.consecutiveErrorLimit }}
{{- end -}}

{{/* PromQL label matchers of one track: pod-template hash, model, namespace (the same order
as ggufship.gate.selector). */}}
{{- define "ggufship-api.trackSelector" -}}
rollouts_pod_template_hash="{{ "{{" }}args.{{ . }}-hash{{ "}}" }}",model="{{ "{{" }}args.model{{ "}}" }}",namespace="{{ "{{" }}args.namespace{{ "}}" }}"
{{- end -}}

{{/* The model to fetch and serve, read from the pod's own annotations. */}}
{{- define "ggufship-api.modelEnv" -}}
- name: GGUFSHIP_MODEL_URI
  valueFrom:
    fieldRef: {fieldPath: "metadata.annotations['ggufship.io/model-uri']"}
- name: GGUFSHIP_MODEL_SHA256
  valueFrom:
    fieldRef: {fieldPath: "metadata.annotations['ggufship.io/model-sha256']"}
{{- end -}}
