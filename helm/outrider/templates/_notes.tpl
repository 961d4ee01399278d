{{/* The text of NOTES.txt (a helper, so tests can render it without a cluster). */}}
{{- define "outrider.notes" -}}
{{- $fullname := include "outrider.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $http := printf "%s-http" $fullname -}}
{{- $grpc := printf "%s-grpc" $fullname -}}
{{- $serve := default dict .Values.config.serve -}}
{{- $target := toString .Values.config.target -}}
{{- $model := default (ternary "SmolLM2-135M-Instruct" (base $target) (eq $target "demo")) $serve.model_name -}}
Outrider {{ .Chart.AppVersion }} is deploying as the RayService {{ $ns }}/{{ $fullname }}.

The model loads after the Ray pods start (GPU pods may take minutes to schedule; the demo model is
fetched on first use). Follow it with:

  kubectl -n {{ $ns }} get rayservice {{ $fullname }} -w
  kubectl -n {{ $ns }} get pods -l app.kubernetes.io/instance={{ .Release.Name }}

Serving starts when the RayService reports the application RUNNING and
  curl http://<http endpoint>/health
answers 200.

1. The HTTP API (OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models, /metrics):
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
   http{{ if $.Values.ingress.tls }}s{{ end }}://{{ .host }}{{ (first .paths).path }}
{{- end }}
{{- else if eq .Values.service.type "LoadBalancer" }}
   export HTTP_HOST=$(kubectl -n {{ $ns }} get svc {{ $http }} -o jsonpath='{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')
   export BASE_URL=http://$HTTP_HOST:{{ .Values.service.http.port }}
{{- else if eq .Values.service.type "NodePort" }}
   export NODE_PORT=$(kubectl -n {{ $ns }} get svc {{ $http }} -o jsonpath='{.spec.ports[0].nodePort}')
   export NODE_IP=$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[0].address}')
   export BASE_URL=http://$NODE_IP:$NODE_PORT
{{- else }}
   Inside the cluster: http://{{ $http }}.{{ $ns }}.svc:{{ .Values.service.http.port }}
   From your machine:
     kubectl -n {{ $ns }} port-forward svc/{{ $http }} {{ .Values.service.http.port }}:{{ .Values.service.http.port }}
     export BASE_URL=http://127.0.0.1:{{ .Values.service.http.port }}
{{- end }}
{{- if include "outrider.apiKey.enabled" . }}

   Every route but /health needs the API key (Secret {{ include "outrider.apiKey.secretName" . }}, key {{ include "outrider.apiKey.secretKey" . }}):
     export OUTRIDER_API_KEY=$(kubectl -n {{ $ns }} get secret {{ include "outrider.apiKey.secretName" . }} -o jsonpath='{.data.{{ include "outrider.apiKey.secretKey" . }}}' | base64 -d)
{{- end }}

   curl $BASE_URL/v1/chat/completions -H 'Content-Type: application/json' \
{{- if include "outrider.apiKey.enabled" . }}
     -H "Authorization: Bearer $OUTRIDER_API_KEY" \
{{- end }}
     -d '{"model": "{{ $model }}", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

{{- if .Values.service.grpc.enabled }}

2. The gRPC API (outrider.v1, protos/outrider/v1/generate.proto; the same API key as metadata
   "authorization: Bearer <key>"):
   Inside the cluster: {{ $grpc }}.{{ $ns }}.svc:{{ .Values.service.grpc.port }}
   From your machine:
     kubectl -n {{ $ns }} port-forward svc/{{ $grpc }} {{ .Values.service.grpc.port }}:{{ .Values.service.grpc.port }}
{{- end }}

The Ray dashboard is not exposed. To look at it, forward it to your machine only:
  kubectl -n {{ $ns }} port-forward svc/{{ $fullname }}-head-svc 8265:8265
Use the chart's Services above for traffic, not KubeRay's {{ $fullname }}-serve-svc (the HTTP proxy
runs on the head pod only).
{{- if not (include "outrider.apiKey.enabled" .) }}

WARNING: no API key is configured (apiKey.generate is false): anyone who reaches the Services can
use the model. Set apiKey.existingSecret, or apiKey.generate: true.
{{- end }}
{{- if eq (include "outrider.stores.mode" .) "memory" }}

NOTE: no Redis is configured: the shared stores live in the engine server's memory and are lost
when it restarts.
{{- end }}
{{- end -}}
