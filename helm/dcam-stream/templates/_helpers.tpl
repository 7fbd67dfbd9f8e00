{{/*
Expand the name of the chart.
*/}}
{{- define "dcam-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (63 chars max, DNS-1123). If the release name contains the chart name it is
used as the full name.
*/}}
{{- define "dcam-stream.fullname" -}}
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

{{- define "dcam-stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "dcam-stream.labels" -}}
helm.sh/chart: {{ include "dcam-stream.chart" . }}
{{ include "dcam-stream.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: dcam-stream
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "dcam-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dcam-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dcam-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dcam-stream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
true when the engine runs on a GPU execution provider.
*/}}
{{- define "dcam-stream.gpu" -}}
{{- if has .Values.config.engine.provider (list "cuda" "tensorrt") }}true{{ end }}
{{- end }}

{{/*
Container image: repository@digest, or repository:tag (default tag = appVersion, + gpuTagSuffix on GPU).
*/}}
{{- define "dcam-stream.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = printf "%s%s" .Chart.AppVersion (ternary .Values.image.gpuTagSuffix "" (eq (include "dcam-stream.gpu" .) "true")) }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Workload kind. exactly_once needs a stable instance id per pod (the Kafka transactional id is
"<group_id>-<instance_id>"; a restarted pod must reuse its predecessor's id to fence it), which a
StatefulSet's pod names give. at_least_once pods are interchangeable, so a Deployment.
*/}}
{{- define "dcam-stream.workloadKind" -}}
{{- $exactlyOnce := eq .Values.config.delivery.mode "exactly_once" }}
{{- if eq .Values.workload.kind "auto" }}
{{- ternary "StatefulSet" "Deployment" $exactlyOnce }}
{{- else if and (eq .Values.workload.kind "Deployment") $exactlyOnce }}
{{- fail "workload.kind=Deployment cannot run config.delivery.mode=exactly_once: transactional ids need stable pod names; use workload.kind auto or StatefulSet" }}
{{- else }}
{{- .Values.workload.kind }}
{{- end }}
{{- end }}

{{/*
Port of config.telemetry.http_addr ("host:port", IPv6 "[::]:port").
*/}}
{{- define "dcam-stream.httpPort" -}}
{{- $addr := .Values.config.telemetry.http_addr }}
{{- $port := regexFind "[0-9]+$" $addr }}
{{- if not $port }}
{{- fail (printf "config.telemetry.http_addr %q has no port" $addr) }}
{{- end }}
{{- $port }}
{{- end }}

{{/* Fixed in-container paths. */}}
{{- define "dcam-stream.configDir" -}}/etc/dcam{{- end }}
{{- define "dcam-stream.kafkaTlsDir" -}}/var/run/secrets/dcam/kafka-tls{{- end }}
{{- define "dcam-stream.modelDir" -}}/opt/dcam/models{{- end }}
{{- define "dcam-stream.writersDir" -}}/var/run/secrets/dcam/writers{{- end }}
{{- define "dcam-stream.controlKeyDir" -}}/var/run/secrets/dcam/control{{- end }}

{{/*
Effective operator configuration: .Values.config plus the keys the chart manages.
Returns YAML (include + fromYaml keeps it a dict).
*/}}
{{- define "dcam-stream.effectiveConfig" -}}
{{- $cfg := deepCopy .Values.config }}
{{- /* heatmap store */}}
{{- $hm := .Values.heatmaps }}
{{- if eq $hm.storage "s3" }}
{{- $store := printf "s3://%s" $hm.s3.bucket }}
{{- with trimAll "/" $hm.s3.prefix }}{{ $store = printf "%s/%s" $store . }}{{ end }}
{{- $_ := set $cfg.heatmap "store" $store }}
{{- else }}
{{- $_ := set $cfg.heatmap "store" (printf "file://%s" $hm.mountPath) }}
{{- end }}
{{- /* Kafka TLS files from the mounted Secret */}}
{{- $tls := .Values.kafka.tls }}
{{- if $tls.existingSecret }}
{{- $dir := include "dcam-stream.kafkaTlsDir" . }}
{{- if $tls.caKey }}{{ $_ := set $cfg.kafka "ssl_ca_location" (printf "%s/%s" $dir $tls.caKey) }}{{ end }}
{{- if $tls.certKey }}{{ $_ := set $cfg.kafka "ssl_certificate_location" (printf "%s/%s" $dir $tls.certKey) }}{{ end }}
{{- if $tls.keyKey }}{{ $_ := set $cfg.kafka "ssl_key_location" (printf "%s/%s" $dir $tls.keyKey) }}{{ end }}
{{- end }}
{{- /* Control-plane secrets, mounted as files from their Secrets */}}
{{- if .Values.ui.tokensSecret }}
{{- $_ := set $cfg.telemetry "tokens_file" (printf "%s/%s" (include "dcam-stream.writersDir" .) .Values.ui.tokensKey) }}
{{- end }}
{{- if .Values.control.signingKeySecret }}
{{- $control := get $cfg "control" | default dict }}
{{- $_ := set $control "signing_key_file" (printf "%s/%s" (include "dcam-stream.controlKeyDir" .) .Values.control.signingKeyKey) }}
{{- $_ := set $cfg "control" $control }}
{{- end }}
{{- /* The operator answers only to the Ingress's host and the Service's names (DNS rebinding) */}}
{{- if and .Values.ui.ingress.enabled .Values.ui.ingress.host }}
{{- $svc := include "dcam-stream.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list .Values.ui.ingress.host $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $_ := set $cfg.telemetry "allowed_hosts" (concat $cfg.telemetry.allowed_hosts $names | uniq) }}
{{- end }}
{{- /* TensorRT engine cache */}}
{{- if and (eq $cfg.engine.provider "tensorrt") .Values.trtEngineCache.enabled }}
{{- $_ := set $cfg.engine "trt_engine_cache" .Values.trtEngineCache.mountPath }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The ConfigMap's config.toml. A small TOML writer: Helm's toToml prints every number as a float
(10000 -> 10000.0), which the operator's integer keys reject.
*/}}
{{- define "dcam-stream.configToml" -}}
# dcam-stream configuration rendered by the Helm chart {{ include "dcam-stream.chart" . }}.
# Layered over the operator's compiled-in defaults; env DCAM__SECTION__KEY wins over this file.
{{- include "dcam-stream.toml.table" (list "" (include "dcam-stream.effectiveConfig" . | fromYaml)) }}
{{ end }}

{{- define "dcam-stream.toml.table" -}}
{{- $prefix := index . 0 }}
{{- $table := index . 1 }}
{{- range $k, $v := $table }}
{{- if not (kindIs "map" $v) }}
{{ include "dcam-stream.toml.key" $k }} = {{ include "dcam-stream.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $table }}
{{- if kindIs "map" $v }}
{{- $name := include "dcam-stream.toml.key" $k }}
{{- if $prefix }}{{ $name = printf "%s.%s" $prefix $name }}{{ end }}

[{{ $name }}]
{{- include "dcam-stream.toml.table" (list $name $v) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dcam-stream.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "dcam-stream.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "float64" . }}
{{- if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "dcam-stream.toml.value" $e }}{{ end }}]
{{- else }}{{ fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/*
Cross-value checks that JSON schema cannot express (values.schema.json covers the rest).
*/}}
{{- define "dcam-stream.validate" -}}
{{- $p := int .Values.kafka.partitions }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: enable only one autoscaler" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) $p) }}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds kafka.partitions (%d): replicas beyond the partition count sit idle" (int .Values.autoscaling.maxReplicas) $p) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.maxReplicaCount) $p) }}
{{- fail (printf "keda.maxReplicaCount (%d) exceeds kafka.partitions (%d): replicas beyond the partition count sit idle" (int .Values.keda.maxReplicaCount) $p) }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount exceeds keda.maxReplicaCount" }}
{{- end }}
{{- if and (not .Values.autoscaling.enabled) (not .Values.keda.enabled) (gt (int .Values.replicaCount) $p) }}
{{- fail (printf "replicaCount (%d) exceeds kafka.partitions (%d): replicas beyond the partition count sit idle" (int .Values.replicaCount) $p) }}
{{- end }}
{{- $proto := .Values.config.kafka.security_protocol }}
{{- if and .Values.kafka.sasl.existingSecret (not (hasPrefix "sasl_" $proto)) }}
{{- fail (printf "kafka.sasl.existingSecret is set but config.kafka.security_protocol is %q (want sasl_plaintext or sasl_ssl)" $proto) }}
{{- end }}
{{- if and .Values.kafka.tls.existingSecret (not (has $proto (list "ssl" "sasl_ssl"))) }}
{{- fail (printf "kafka.tls.existingSecret is set but config.kafka.security_protocol is %q (want ssl or sasl_ssl)" $proto) }}
{{- end }}
{{- if and (hasPrefix "sasl_" $proto) (not .Values.config.kafka.sasl_mechanism) }}
{{- fail "config.kafka.sasl_mechanism is required with a sasl_* security_protocol" }}
{{- end }}
{{- if and (eq .Values.heatmaps.storage "s3") (not .Values.heatmaps.s3.bucket) }}
{{- fail "heatmaps.storage=s3 needs heatmaps.s3.bucket" }}
{{- end }}
{{- if and .Values.keda.enabled (hasPrefix "sasl_" $proto) (not .Values.kafka.sasl.usernameKey) }}
{{- fail "keda with SASL reads the username from a Secret: set kafka.sasl.usernameKey (and kafka.sasl.existingSecret)" }}
{{- end }}
{{- if and .Values.keda.enabled (eq .Values.config.kafka.sasl_mechanism "OAUTHBEARER") }}
{{- fail "keda: the chart's TriggerAuthentication supports PLAIN and SCRAM only; bring your own ScaledObject for OAUTHBEARER" }}
{{- end }}
{{- if and .Values.ui.ingress.enabled (not .Values.ui.readTokenSecret) }}
{{- fail "ui.ingress.enabled publishes images and scores: set ui.readTokenSecret (a Secret with the read token)" }}
{{- end }}
{{- $_ := include "dcam-stream.workloadKind" . }}
{{- end }}

{{/*
Container env: secrets (never in the ConfigMap) and the per-pod instance id, as DCAM__SECTION__KEY
overrides, then extraEnv.
*/}}
{{- define "dcam-stream.env" -}}
{{- if eq .Values.config.delivery.mode "exactly_once" }}
# Transactional id "<group_id>-<pod name>": stable across restarts of a StatefulSet pod.
- name: DCAM__DELIVERY__INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- if .Values.kafka.sasl.existingSecret }}
- name: DCAM__KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- if .Values.kafka.sasl.usernameKey }}
- name: DCAM__KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
{{- end }}
{{- end }}
{{- if and .Values.kafka.tls.existingSecret .Values.kafka.tls.keyPasswordKey }}
- name: DCAM__KAFKA__SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.tls.existingSecret }}
      key: {{ .Values.kafka.tls.keyPasswordKey }}
{{- end }}
{{- if and (eq .Values.heatmaps.storage "s3") .Values.heatmaps.s3.existingSecret }}
- name: DCAM__S3__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.heatmaps.s3.existingSecret }}
      key: {{ .Values.heatmaps.s3.accessKeyIdKey }}
- name: DCAM__S3__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.heatmaps.s3.existingSecret }}
      key: {{ .Values.heatmaps.s3.secretAccessKeyKey }}
{{- end }}
{{- if .Values.ui.tokenSecret }}
- name: DCAM__TELEMETRY__API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ui.tokenSecret }}
      key: {{ .Values.ui.tokenKey }}
{{- end }}
{{- if .Values.ui.readTokenSecret }}
- name: DCAM__TELEMETRY__READ_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ui.readTokenSecret }}
      key: {{ .Values.ui.readTokenKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Increase of a counter over a window, counting series created inside the window in full: the
operator creates a labelled counter at its first increment, and increase() alone would miss it.
Arguments: (list "<selector expression>" "<window>").
*/}}
{{- define "dcam-stream.increase" -}}
{{- $m := index . 0 }}{{ $w := index . 1 -}}
(increase({{ $m }}[{{ $w }}]) unless ({{ $m }} unless {{ $m }} offset {{ $w }}))
or
({{ $m }} unless {{ $m }} offset {{ $w }})
{{- end }}
