{{/* Name of every object: the release name (or fullnameOverride), at most 45 characters. */}}
{{- define "gptj.fullname" -}}
{{- $name := default .Release.Name .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "name %q: use lower-case letters, digits and '-', starting with a letter (KServe/Knative names are DNS-1035 labels)" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "gptj.selectorLabels" -}}
app.kubernetes.io/name: gptj
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gptj.labels" -}}
{{ include "gptj.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "gptj.image" -}}
{{- $tag := .Values.image.tag -}}
{{- if not $tag -}}
{{- $tag = ternary (printf "%s-cuda" .Chart.AppVersion) .Chart.AppVersion .Values.gpu.enabled -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The hub reference the server is given: id[@revision]. */}}
{{- define "gptj.modelRef" -}}
{{- if .Values.model.revision -}}
{{- printf "%s@%s" .Values.model.id .Values.model.revision -}}
{{- else -}}
{{- .Values.model.id -}}
{{- end -}}
{{- end -}}

{{/* Where gptj keeps that model inside the cache: <org>--<name>/<revision>. */}}
{{- define "gptj.snapshotDir" -}}
{{- printf "%s/%s" (replace "/" "--" .Values.model.id) (default "main" .Values.model.revision) -}}
{{- end -}}

{{- define "gptj.claimName" -}}
{{- default (printf "%s-model-cache" (include "gptj.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{- define "gptj.apiKeySecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "gptj.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The mount point of the model cache: KServe mounts pvc:// STORAGE_URIs at /mnt/models. */}}
{{- define "gptj.cacheDir" -}}/mnt/models{{- end -}}

{{- define "gptj.isKServe" -}}
{{- if ne .Values.deploymentMode "Deployment" -}}true{{- end -}}
{{- end -}}

{{/* Replicas below 1 only make sense (scale to zero) on Knative. */}}
{{- define "gptj.minReplicas" -}}
{{- if eq .Values.deploymentMode "Serverless" -}}
{{- int .Values.minReplicas -}}
{{- else -}}
{{- max 1 (int .Values.minReplicas) -}}
{{- end -}}
{{- end -}}

{{- define "gptj.checks" -}}
{{- if gt (int .Values.minReplicas) (int .Values.maxReplicas) -}}
{{- fail (printf "minReplicas (%d) must not exceed maxReplicas (%d)" (int .Values.minReplicas) (int .Values.maxReplicas)) -}}
{{- end -}}
{{- if and (eq .Values.deploymentMode "Serverless") (lt (int .Values.kserve.timeoutSeconds) (int .Values.server.shutdownTimeoutSeconds)) -}}
{{- fail "kserve.timeoutSeconds is the pod's termination grace period in Serverless mode: it must be >= server.shutdownTimeoutSeconds" -}}
{{- end -}}
{{- if and (eq .Values.autoscaling.knative.metric "rps") (eq (int .Values.autoscaling.knative.target) 0) -}}
{{- fail "autoscaling.knative.target 0 (derived from the batch and queue sizes) needs metric concurrency: set a target in requests per second for rps" -}}
{{- end -}}
{{- if and .Values.inferencePool.enabled (not .Values.benchmark.only) -}}
{{- if eq .Values.deploymentMode "Serverless" -}}
{{- fail "inferencePool needs deploymentMode Deployment or RawDeployment: an InferencePool routes to pods directly, past Knative's activator and queue-proxy, so Knative could neither count the requests nor scale from zero" -}}
{{- end -}}
{{- if not .Values.inferencePool.endpointPicker.name -}}
{{- fail "inferencePool.endpointPicker.name: name the endpoint picker's Service (deploy one: docs/deploy.md, 'More than one replica')" -}}
{{- end -}}
{{- if and .Values.inferencePool.httpRoute.enabled (not .Values.inferencePool.httpRoute.parentRefs) -}}
{{- fail "inferencePool.httpRoute.parentRefs: name the Gateway the HTTPRoute attaches to (or set inferencePool.httpRoute.enabled=false)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.benchmark.only (lt (int .Values.benchmark.batchSize) 1) -}}
{{- fail "benchmark.only needs benchmark.batchSize >= 1 (0 turns the benchmark off)" -}}
{{- end -}}
{{- end -}}

{{/* Seconds a pod may take to stop: preStop sleep + the server's drain + margin. */}}
{{- define "gptj.terminationGracePeriod" -}}
{{- add (int .Values.server.preStopSleepSeconds) (int .Values.server.shutdownTimeoutSeconds) 15 -}}
{{- end -}}

{{/* Worst-case start: what the startup probe allows. */}}
{{- define "gptj.startupBudgetSeconds" -}}
{{- mul (int .Values.probes.startup.periodSeconds) (int .Values.probes.startup.failureThreshold) -}}
{{- end -}}

{{/* Resources with the GPUs added to requests and limits. Call with (list $root $resources). */}}
{{- define "gptj.resourcesWithGpu" -}}
{{- $root := index . 0 -}}
{{- $res := deepCopy (index . 1 | default dict) -}}
{{- if $root.Values.gpu.enabled -}}
{{- $gpu := dict $root.Values.gpu.resourceName (int $root.Values.gpu.count) -}}
{{- $_ := set $res "limits" (merge (deepCopy (get $res "limits" | default dict)) $gpu) -}}
{{- $_ := set $res "requests" (merge (deepCopy (get $res "requests" | default dict)) $gpu) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* GPU placement and the user's scheduling constraints, as pod-spec fields. */}}
{{- define "gptj.scheduling" -}}
{{- $ns := deepCopy .Values.nodeSelector -}}
{{- $aff := deepCopy .Values.affinity -}}
{{- if and .Values.gpu.enabled .Values.gpu.type -}}
{{- if eq .Values.gpu.placement "nodeSelector" -}}
{{- $_ := set $ns .Values.gpu.nodeLabel .Values.gpu.type -}}
{{- else -}}
{{- $term := dict "matchExpressions" (list (dict "key" .Values.gpu.nodeLabel "operator" "In" "values" (list .Values.gpu.type))) -}}
{{- $req := dict "nodeSelectorTerms" (list $term) -}}
{{- $_ := set $aff "nodeAffinity" (merge (dict "requiredDuringSchedulingIgnoredDuringExecution" $req) (get $aff "nodeAffinity" | default dict)) -}}
{{- end -}}
{{- end -}}
{{- with $ns }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $aff }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Settings every gptj process (server, benchmark) takes from the environment. */}}
{{- define "gptj.modelEnv" -}}
- name: GPTJ_MODEL
  value: {{ include "gptj.modelRef" . | quote }}
- name: GPTJ_PRECISION
  value: {{ .Values.precision | quote }}
- name: GPTJ_DEVICE
  value: {{ ternary "cuda" "cpu" .Values.gpu.enabled | quote }}
- name: GPTJ_CACHE_DIR
  value: {{ include "gptj.cacheDir" . | quote }}
- name: GPTJ_BLOCK_SIZE
  value: {{ int .Values.server.blockSize | quote }}
{{- with .Values.server.kvCacheMemory }}
- name: GPTJ_KV_CACHE_MEMORY
  value: {{ . | quote }}
{{- end }}
{{- if .Values.model.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.hfTokenSecret.name }}
      key: {{ .Values.model.hfTokenSecret.key }}
{{- end }}
{{- end -}}

{{/* The server's environment: model, limits, generation defaults, API keys. */}}
{{- define "gptj.serverEnv" -}}
{{ include "gptj.modelEnv" . }}
- name: GPTJ_MODEL_NAME
  value: {{ .Values.model.name | quote }}
- name: GPTJ_LOG_FORMAT
  value: {{ .Values.server.logFormat | quote }}
- name: GPTJ_SHUTDOWN_TIMEOUT
  value: {{ printf "%ds" (int .Values.server.shutdownTimeoutSeconds) | quote }}
- name: GPTJ_REQUEST_TIMEOUT
  value: {{ printf "%ds" (int .Values.server.requestTimeoutSeconds) | quote }}
- name: GPTJ_MAX_NUM_SEQS
  value: {{ int .Values.queue.maxNumSeqs | quote }}
- name: GPTJ_MAX_BATCHED_TOKENS
  value: {{ int .Values.queue.maxBatchedTokens | quote }}
- name: GPTJ_MAX_QUEUED_SEQS
  value: {{ int .Values.queue.maxQueuedSeqs | quote }}
- name: GPTJ_MAX_QUEUED_TOKENS
  value: {{ int64 .Values.queue.maxQueuedTokens | quote }}
- name: GPTJ_MAX_INSTANCES
  value: {{ int .Values.queue.maxInstances | quote }}
- name: GPTJ_MAX_SEQUENCES_PER_REQUEST
  value: {{ int .Values.queue.maxSequencesPerRequest | quote }}
- name: GPTJ_BODY_LIMIT
  value: {{ .Values.queue.bodyLimit | quote }}
{{- with .Values.generation }}
{{- if kindIs "invalid" .maxLength }}
- name: GPTJ_MAX_NEW_TOKENS
  value: {{ int .maxNewTokens | quote }}
{{- else }}
- name: GPTJ_MAX_LENGTH
  value: {{ int .maxLength | quote }}
{{- end }}
{{- if kindIs "invalid" .minLength }}
- name: GPTJ_MIN_NEW_TOKENS
  value: {{ int .minNewTokens | quote }}
{{- else }}
- name: GPTJ_MIN_LENGTH
  value: {{ int .minLength | quote }}
{{- end }}
- name: GPTJ_DO_SAMPLE
  value: {{ .doSample | toString | quote }}
- name: GPTJ_TEMPERATURE
  value: {{ .temperature | toString | quote }}
- name: GPTJ_TOP_K
  value: {{ int .topK | quote }}
- name: GPTJ_TOP_P
  value: {{ .topP | toString | quote }}
- name: GPTJ_REPETITION_PENALTY
  value: {{ .repetitionPenalty | toString | quote }}
{{- if not (kindIs "invalid" .seed) }}
- name: GPTJ_SEED
  value: {{ int64 .seed | quote }}
{{- end }}
- name: GPTJ_NUM_RETURN_SEQUENCES
  value: {{ int .numReturnSequences | quote }}
- name: GPTJ_RETURN_FULL_TEXT
  value: {{ .returnFullText | toString | quote }}
{{- end }}
{{- with include "gptj.apiKeySecret" . }}
- name: GPTJ_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.secretKey }}
{{- end }}
{{- with .Values.server.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* startup/readiness/liveness probes on the container port. */}}
{{- define "gptj.probes" -}}
{{- $port := int .Values.server.containerPort -}}
{{- $ready := printf "/v1/models/%s" .Values.model.name -}}
{{- if .Values.probes.startup.enabled }}
startupProbe:
  httpGet:
    path: {{ $ready }}
    port: {{ $port }}
  periodSeconds: {{ int .Values.probes.startup.periodSeconds }}
  timeoutSeconds: {{ int .Values.probes.startup.timeoutSeconds }}
  failureThreshold: {{ int .Values.probes.startup.failureThreshold }}
{{- end }}
readinessProbe:
  httpGet:
    path: {{ $ready }}
    port: {{ $port }}
  periodSeconds: {{ int .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ int .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ int .Values.probes.readiness.failureThreshold }}
livenessProbe:
  httpGet:
    path: /
    port: {{ $port }}
  periodSeconds: {{ int .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ int .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ int .Values.probes.liveness.failureThreshold }}
{{- end -}}

{{- define "gptj.metricsAnnotations" -}}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int .Values.server.containerPort | quote }}
prometheus.io/path: /metrics
{{- if include "gptj.isKServe" . }}
prometheus.kserve.io/port: {{ int .Values.server.containerPort | quote }}
prometheus.kserve.io/path: /metrics
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level securityContext (everywhere but Knative, which refuses it). */}}
{{- define "gptj.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ int (default 10001 .Values.securityContext.runAsUser) }}
  runAsGroup: {{ int (default 10001 .Values.securityContext.runAsGroup) }}
  fsGroup: {{ int (default 10001 .Values.securityContext.runAsGroup) }}
  fsGroupChangePolicy: OnRootMismatch
{{- end -}}

{{/* A number as a quoted Kubernetes quantity: 0.8 -> "800m", 4 -> "4". */}}
{{- define "gptj.milli" -}}
{{- $m := round (mulf (float64 .) 1000.0) 0 | int64 -}}
{{- if eq (mod $m 1000) 0 -}}{{ div $m 1000 | toString | quote }}{{- else -}}{{ printf "%dm" $m | quote }}{{- end -}}
{{- end -}}

{{/* The PromQL label matchers that select this release's series (dashboard excepted). */}}
{{- define "gptj.promSelector" -}}
{{- if .Values.metrics.selector -}}
{{- .Values.metrics.selector -}}
{{- else -}}
{{- printf "namespace=%q,pod=~%q" .Release.Namespace (printf "%s-.*" (include "gptj.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{/* Knative's per-pod concurrency target: 0 means the batch plus the queue the HPA aims at. */}}
{{- define "gptj.knativeTarget" -}}
{{- if gt (int .Values.autoscaling.knative.target) 0 -}}
{{- int .Values.autoscaling.knative.target -}}
{{- else -}}
{{- add (int .Values.queue.maxNumSeqs) (ceil .Values.autoscaling.llm.requestsWaiting | int) -}}
{{- end -}}
{{- end -}}

{{/* The server pods' own labels: podLabels, and the EPP's engine-type label with a pool. */}}
{{- define "gptj.podLabels" -}}
{{- $l := deepCopy .Values.podLabels -}}
{{- if and .Values.inferencePool.enabled .Values.inferencePool.engineTypeLabel -}}
{{- $_ := set $l .Values.inferencePool.engineTypeLabel "gptj" -}}
{{- end -}}
{{- with $l }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* The InferencePool's pod selector: the server pods only (never the Jobs'). */}}
{{- define "gptj.poolSelector" -}}
{{- if eq .Values.deploymentMode "Deployment" -}}
{{ include "gptj.selectorLabels" . }}
app.kubernetes.io/component: server
{{- else -}}
serving.kserve.io/inferenceservice: {{ include "gptj.fullname" . }}
{{- end -}}
{{- end -}}
