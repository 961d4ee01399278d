{{/*
Helpers of the Outrider chart: names, labels, the secrets' names, the engine configuration the
chart renders into serveConfigV2, and the one pod template every Ray group (head and each worker
role) is built from.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "outrider.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name prefix of every object: fullnameOverride, or "<release>-<name>" (just the release
name when it already contains the chart name). Cut to 40 characters: the chart appends up to 15
(-redis-headless) and KubeRay derives its RayCluster's name (<name>-raycluster-xxxxx, also a
label value, at most 63) and Services (<name>-serve-svc) from it.
*/}}
{{- define "outrider.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "outrider.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the release's objects (stable across upgrades). */}}
{{- define "outrider.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outrider.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object the chart renders. */}}
{{- define "outrider.labels" -}}
helm.sh/chart: {{ include "outrider.chart" . }}
{{ include "outrider.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outrider
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations of every object (commonAnnotations), or nothing. */}}
{{- define "outrider.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The Ray container image: repository@digest, or repository:tag (default: appVersion). */}}
{{- define "outrider.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of the Ray pods. */}}
{{- define "outrider.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "outrider.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ secrets */}}

{{/* "true" when clients must send an API key. */}}
{{- define "outrider.apiKey.enabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value .Values.apiKey.generate -}}true{{- end -}}
{{- end -}}

{{/* "true" when the chart owns the API key's Secret. */}}
{{- define "outrider.apiKey.chartSecret" -}}
{{- if and (not .Values.apiKey.existingSecret) (or .Values.apiKey.value .Values.apiKey.generate) -}}true{{- end -}}
{{- end -}}

{{- define "outrider.apiKey.secretName" -}}
{{- default (printf "%s-api-key" (include "outrider.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "outrider.apiKey.secretKey" -}}
{{- if .Values.apiKey.existingSecret -}}{{ .Values.apiKey.existingSecretKey }}{{- else -}}api-key{{- end -}}
{{- end -}}

{{/* Name of the built-in Redis (its Service, StatefulSet and Secret). */}}
{{- define "outrider.redis.fullname" -}}
{{- printf "%s-redis" (include "outrider.fullname" .) -}}
{{- end -}}

{{/* The store backend the chart configures: redis-builtin, redis-external or memory. */}}
{{- define "outrider.stores.mode" -}}
{{- if .Values.redis.enabled -}}redis-builtin
{{- else if .Values.externalRedis.url -}}redis-external
{{- else -}}memory
{{- end -}}
{{- end -}}

{{/* The Secret and key holding the Redis password, as "name/key"; empty when there is none. */}}
{{- define "outrider.redis.passwordRef" -}}
{{- $mode := include "outrider.stores.mode" . -}}
{{- if eq $mode "redis-builtin" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- printf "%s/%s" .Values.redis.auth.existingSecret .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- printf "%s/redis-password" (include "outrider.redis.fullname" .) -}}
{{- end -}}
{{- else if and (eq $mode "redis-external") .Values.externalRedis.existingSecret -}}
{{- printf "%s/%s" .Values.externalRedis.existingSecret .Values.externalRedis.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/*
A random secret value that survives upgrades: the value already stored under key in the Secret
named name (when the cluster is reachable: helm install/upgrade), else a new random one. Called
with (dict "root" $ "name" NAME "key" KEY). Returns the base64 form for Secret.data.
*/}}
{{- define "outrider.persistentRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ roles and configuration */}}

{{/* Where the draft runs: none (config.draft none or no draft tokens), colocated or separate. */}}
{{- define "outrider.draftMode" -}}
{{- $draft := toString (default "none" .Values.config.draft) | trim -}}
{{- $k := .Values.config.num_draft_tokens -}}
{{- if or (eq $draft "none") (and (kindIs "float64" $k) (eq (int $k) 0)) (and (kindIs "int64" $k) (eq (int $k) 0)) -}}none
{{- else -}}{{ .Values.workers.draft.placement }}
{{- end -}}
{{- end -}}

{{/*
The worker groups the release runs, as a YAML list of role names (in order). The target always;
the draft when it runs on its own pods. Later roles (prefill/decode, attention/FFN) join here.
*/}}
{{- define "outrider.workerRoles" -}}
- target
{{- if eq (include "outrider.draftMode" .) "separate" }}
- draft
{{- end }}
{{- end -}}

{{/* The keys of workerDefaults a role may override. */}}
{{- define "outrider.workerOverridableKeys" -}}
resources nodeSelector tolerations affinity rayStartParams env podLabels podAnnotations livenessProbe readinessProbe
{{- end -}}

{{/*
The settings of one worker role: workerDefaults with the role's own keys laid over them (each key
replaced whole), plus replicas and gpus. Called with (dict "root" $ "role" ROLE); returns YAML.
*/}}
{{- define "outrider.workerSpec" -}}
{{- $root := .root -}}
{{- $role := index $root.Values.workers .role -}}
{{- $spec := dict "replicas" $role.replicas "gpus" $role.gpus -}}
{{- range $key := splitList " " (include "outrider.workerOverridableKeys" $root) -}}
{{- if hasKey $role $key -}}
{{- $_ := set $spec $key (index $role $key) -}}
{{- else -}}
{{- $_ := set $spec $key (index $root.Values.workerDefaults $key) -}}
{{- end -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/*
Values the chart owns and refuses elsewhere: config fields it derives, and rayStartParams it sets.
Rendering fails with a message that names the value to use instead.
*/}}
{{- define "outrider.validate" -}}
{{- $owned := dict
  "target_gpus" "workers.target.gpus"
  "draft_gpus" "workers.draft.gpus (with workers.draft.placement: separate)"
  "colocate" "workers.draft.placement"
  "node_pools" "the worker groups (the chart always sets per_role)"
  "address" "the RayService (the application runs inside the Ray cluster)"
  "num_gpus" "the worker groups (num_gpus only declares GPUs of a local Ray)"
-}}
{{- range $key, $instead := $owned -}}
{{- if hasKey $.Values.config $key -}}
{{- fail (printf "config.%s is set by the chart; use %s instead" $key $instead) -}}
{{- end -}}
{{- end -}}
{{- $serve := default dict .Values.config.serve -}}
{{- if not (kindIs "map" $serve) -}}
{{- fail "config.serve must be a mapping of serving options" -}}
{{- end -}}
{{- $ownedServe := dict
  "host" "nothing (the chart listens on 0.0.0.0 in the pod)"
  "http_port" "service.http.port"
  "grpc_port" "service.grpc.port / service.grpc.enabled"
  "api_key" "apiKey.existingSecret or apiKey.value (the key travels in a Secret)"
  "ingress_resource" "nothing (the chart pins the front ends to the head pod)"
-}}
{{- range $key, $instead := $ownedServe -}}
{{- if hasKey $serve $key -}}
{{- fail (printf "config.serve.%s is set by the chart; use %s instead" $key $instead) -}}
{{- end -}}
{{- end -}}
{{- $stores := default dict .Values.config.stores -}}
{{- if not (kindIs "map" $stores) -}}
{{- fail "config.stores must be a mapping of store options" -}}
{{- end -}}
{{- range $key := list "backend" "redis_url" "redis_password" -}}
{{- if hasKey $stores $key -}}
{{- fail (printf "config.stores.%s is set by the chart; use redis.* (built-in Redis) or externalRedis.* instead" $key) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.externalRedis.url -}}
{{- fail "redis.enabled and externalRedis.url are both set: switch the built-in Redis off (redis.enabled: false) to use an external one" -}}
{{- end -}}
{{- $params := list (dict "where" "head.rayStartParams" "params" .Values.head.rayStartParams) (dict "where" "workerDefaults.rayStartParams" "params" .Values.workerDefaults.rayStartParams) -}}
{{- range $name, $role := .Values.workers -}}
{{- if hasKey $role "rayStartParams" -}}
{{- $params = append $params (dict "where" (printf "workers.%s.rayStartParams" $name) "params" $role.rayStartParams) -}}
{{- end -}}
{{- end -}}
{{- range $p := $params -}}
{{- range $key := list "num-gpus" "resources" -}}
{{- if hasKey (default dict $p.params) $key -}}
{{- fail (printf "%s.%s is set by the chart (from the role's gpus and its outrider_<role> resource); remove it" $p.where $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $reserved := dict "6379" "the Ray GCS" "8265" "the Ray dashboard" "10001" "the Ray client server" "52365" "the Ray dashboard agent" "8080" "Ray's metrics export" -}}
{{- $ports := dict "service.http.port" (int .Values.service.http.port) -}}
{{- if .Values.service.grpc.enabled -}}
{{- $_ := set $ports "service.grpc.port" (int .Values.service.grpc.port) -}}
{{- if eq (int .Values.service.grpc.port) (int .Values.service.http.port) -}}
{{- fail (printf "service.http.port and service.grpc.port are both %d: the HTTP and gRPC APIs need their own ports" (int .Values.service.http.port)) -}}
{{- end -}}
{{- end -}}
{{- range $where, $port := $ports -}}
{{- if hasKey $reserved (toString $port) -}}
{{- fail (printf "%s=%d is the port of %s on the head pod; choose another" $where $port (index $reserved (toString $port))) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (include "outrider.draftMode" .) "colocated") (gt (int .Values.workers.draft.gpus) 1) -}}
{{- fail "workers.draft.gpus > 1 needs workers.draft.placement: separate (a colocated draft shares one GPU of the target)" -}}
{{- end -}}
{{- end -}}

{{/*
The engine configuration (ClusterConfig, cluster/config.py) as YAML: config from the values with
the fields the chart derives laid over it.
*/}}
{{- define "outrider.config" -}}
{{- $cfg := deepCopy (default dict .Values.config) -}}
{{- $mode := include "outrider.draftMode" . -}}
{{- $_ := set $cfg "target_gpus" (int .Values.workers.target.gpus) -}}
{{- if eq $mode "separate" -}}
{{- $_ := set $cfg "draft_gpus" (int .Values.workers.draft.gpus) -}}
{{- $_ := set $cfg "colocate" false -}}
{{- else if eq $mode "colocated" -}}
{{- $_ := set $cfg "draft_gpus" 0 -}}
{{- $_ := set $cfg "colocate" true -}}
{{- end -}}
{{- $_ := set $cfg "node_pools" "per_role" -}}
{{- $serve := deepCopy (default dict .Values.config.serve) -}}
{{- $_ := set $serve "host" "0.0.0.0" -}}
{{- $_ := set $serve "http_port" (int .Values.service.http.port) -}}
{{- if .Values.service.grpc.enabled -}}
{{- $_ := set $serve "grpc_port" (int .Values.service.grpc.port) -}}
{{- else -}}
{{- $_ := set $serve "grpc_port" nil -}}
{{- end -}}
{{- $_ := set $serve "ingress_resource" "outrider_ingress" -}}
{{- $_ := set $cfg "serve" $serve -}}
{{- $stores := deepCopy (default dict .Values.config.stores) -}}
{{- $storesMode := include "outrider.stores.mode" . -}}
{{- if eq $storesMode "redis-builtin" -}}
{{- $_ := set $stores "backend" "redis" -}}
{{- $_ := set $stores "redis_url" (printf "redis://%s:6379/0" (include "outrider.redis.fullname" .)) -}}
{{- else if eq $storesMode "redis-external" -}}
{{- $_ := set $stores "backend" "redis" -}}
{{- $_ := set $stores "redis_url" .Values.externalRedis.url -}}
{{- else -}}
{{- $_ := set $stores "backend" "memory" -}}
{{- end -}}
{{- $_ := set $cfg "stores" $stores -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The Ray Serve configuration (serveConfigV2): one application built from the configuration. */}}
{{- define "outrider.serveConfig" -}}
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: {{ int .Values.service.http.port }}
applications:
  - name: outrider
    route_prefix: /
    import_path: cluster.serve.app:app_builder
    args:
      config:
        {{- include "outrider.config" . | nindent 8 }}
{{- end -}}

{{/* rayStartParams as KubeRay wants them: strings; custom resources as an escaped JSON string. */}}
{{- define "outrider.rayResources" -}}
{{- $parts := list -}}
{{- range $name, $amount := . -}}
{{- $parts = append $parts (printf "\\\"%s\\\": %v" $name $amount) -}}
{{- end -}}
{{- printf "\"{%s}\"" (join ", " $parts) -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the shared pod template */}}

{{/*
The pod template of one Ray group. Called with a dict:
  root       the chart's root context ($)
  component  "head" or the role name (target, draft, ...): the pod's component label
  container  the container name (ray-head, ray-worker)
  gpus       GPUs of the pod (0 for the head)
  spec       the group's settings: resources, nodeSelector, tolerations, affinity, env, podLabels,
             podAnnotations, livenessProbe, readinessProbe
  ports      extra container ports (list of ContainerPort)
*/}}
{{- define "outrider.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $spec := .spec -}}
{{- $resources := deepCopy (default dict $spec.resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default dict (get $resources "limits") -}}
{{- $_ := set $limits $v.gpuResourceName (int .gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $requests := default dict (get $resources "requests") -}}
{{- $_ := set $requests $v.gpuResourceName (int .gpus) -}}
{{- $_ := set $resources "requests" $requests -}}
{{- end -}}
metadata:
  labels:
    {{- include "outrider.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    app.kubernetes.io/part-of: outrider
    {{- with $v.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $spec.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (deepCopy (default dict $spec.podAnnotations)) (default dict $v.podAnnotations) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "outrider.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "outrider.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: OUTRIDER_CACHE
          value: {{ $v.cache.mountPath | quote }}
        - name: XDG_CACHE_HOME
          value: /tmp/.cache
        {{- if include "outrider.apiKey.enabled" $root }}
        - name: OUTRIDER_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "outrider.apiKey.secretName" $root }}
              key: {{ include "outrider.apiKey.secretKey" $root }}
        {{- end }}
        {{- with include "outrider.redis.passwordRef" $root }}
        {{- $ref := splitList "/" . }}
        - name: OUTRIDER_STORES_REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ index $ref 0 }}
              key: {{ index $ref 1 }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $spec.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $spec.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        - name: cache
          mountPath: {{ $v.cache.mountPath }}
        {{- if $v.models.existingClaim }}
        - name: models
          mountPath: {{ $v.models.mountPath }}
          readOnly: true
          {{- with $v.models.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.ray.shmSize }}
    - name: cache
      {{- if $v.cache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $v.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $v.cache.sizeLimit }}
      {{- end }}
    {{- if $v.models.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $v.models.existingClaim }}
        readOnly: true
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
