{{/* Names and labels. */}}
{{- define "bgjobs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bgjobs.fullname" -}}
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

{{/* Cluster-scoped objects carry the release namespace: two releases of the same name must not collide. */}}
{{- define "bgjobs.clusterName" -}}
{{- printf "%s-%s" (include "bgjobs.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "bgjobs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bgjobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bgjobs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "bgjobs.labels" -}}
helm.sh/chart: {{ include "bgjobs.chart" . }}
{{ include "bgjobs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bgjobs
{{- end -}}

{{- define "bgjobs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bgjobs.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bgjobs.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespace of the cluster-wide Leases (exclusive strategy, cluster slots). */}}
{{- define "bgjobs.leaseNamespace" -}}
{{- default .Release.Namespace .Values.operator.leaseNamespace -}}
{{- end -}}

{{/* A duration as the operator reads it (15s, 500ms, 2m, 1h, or plain seconds), in milliseconds. */}}
{{- define "bgjobs.ms" -}}
{{- $s := toString . | trim -}}
{{- $digits := regexFind "^[0-9]+" $s -}}
{{- $unit := trimPrefix $digits $s -}}
{{- /* Without its leading zeros: Helm's int64 reads "0600" as octal, the operator as 600. */ -}}
{{- $n := regexReplaceAll "^0+([0-9])" $digits "${1}" | int64 -}}
{{- if eq $unit "ms" -}}
{{- $n -}}
{{- else if eq $unit "h" -}}
{{- mul $n 3600000 -}}
{{- else if eq $unit "m" -}}
{{- mul $n 60000 -}}
{{- else -}}
{{- mul $n 1000 -}}
{{- end -}}
{{- end -}}

{{/* Whole seconds, rounded up, of a duration. */}}
{{- define "bgjobs.seconds" -}}
{{- div (add (include "bgjobs.ms" . | int64) 999) 1000 -}}
{{- end -}}

{{/* The Pod's termination grace period: shutdown grace + renew deadline (hand-back) + 5 s to exit. */}}
{{- define "bgjobs.terminationGracePeriodSeconds" -}}
{{- $needed := add (include "bgjobs.seconds" .Values.operator.shutdownGrace | int64) (include "bgjobs.seconds" .Values.operator.renewDeadline | int64) -}}
{{- if eq (toString .Values.terminationGracePeriodSeconds) "<nil>" -}}
{{- add $needed 5 -}}
{{- else if lt (.Values.terminationGracePeriodSeconds | int64) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) is shorter than operator.shutdownGrace + operator.renewDeadline (%d s): Kubernetes would kill replicas before they hand their running jobs back. Raise it, or leave it null to derive it." .Values.terminationGracePeriodSeconds $needed) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds | int64 -}}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express; each fails the install with a message that names the values. */}}
{{- define "bgjobs.validate" -}}
{{- $o := .Values.operator -}}
{{- $lease := include "bgjobs.ms" $o.leaseDuration | int64 -}}
{{- $deadline := include "bgjobs.ms" $o.renewDeadline | int64 -}}
{{- $interval := include "bgjobs.ms" $o.renewInterval | int64 -}}
{{- if not (lt $deadline $lease) -}}
{{- fail (printf "operator.renewDeadline (%v) must be shorter than operator.leaseDuration (%v)" $o.renewDeadline $o.leaseDuration) -}}
{{- end -}}
{{- if not (lt $interval $deadline) -}}
{{- fail (printf "operator.renewInterval (%v) must be shorter than operator.renewDeadline (%v)" $o.renewInterval $o.renewDeadline) -}}
{{- end -}}
{{- if not (gt $interval 0) -}}
{{- fail (printf "operator.renewInterval (%v) must be longer than 0" $o.renewInterval) -}}
{{- end -}}
{{- if and (eq $o.strategy "exclusive") $o.queues -}}
{{- fail "operator.strategy exclusive runs every job on the one leader: it cannot be combined with operator.queues (a leader serving some queues would starve the others)" -}}
{{- end -}}
{{- if and $o.identity (not (contains "$(POD_NAME)" $o.identity)) -}}
{{- fail (printf "operator.identity %q would be the same on every replica, and on the old and the new Pod of every rollout (which take its member Lease from each other); include $(POD_NAME) in it, or leave it empty" $o.identity) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false: set serviceAccount.name to the ServiceAccount the operator runs as (the chart binds its roles to it; it would otherwise bind them to the namespace's default ServiceAccount)" -}}
{{- end -}}
{{- if .Values.autoscaling.enabled -}}
{{- if not (or .Values.autoscaling.cpu.enabled .Values.autoscaling.queueDepth.enabled) -}}
{{- fail "autoscaling.enabled needs a metric: set autoscaling.cpu.enabled and/or autoscaling.queueDepth.enabled" -}}
{{- end -}}
{{- if and .Values.autoscaling.cpu.enabled (not (dig "requests" "cpu" "" .Values.resources)) -}}
{{- fail "autoscaling.cpu.enabled needs resources.requests.cpu (CPU utilization is measured against the request)" -}}
{{- end -}}
{{- if lt (.Values.autoscaling.maxReplicas | int) (.Values.autoscaling.minReplicas | int) -}}
{{- fail (printf "autoscaling.maxReplicas (%v) is below autoscaling.minReplicas (%v)" .Values.autoscaling.maxReplicas .Values.autoscaling.minReplicas) -}}
{{- end -}}
{{- end -}}
{{- $w := .Values.admissionWebhook -}}
{{- if include "bgjobs.creatorCheck" . -}}
{{- if not $w.enabled -}}
{{- fail (printf "operator.podCreatorCheck %q needs admissionWebhook.enabled: the webhook records the creators it checks (without it, a job's creator record is whatever its author wrote)" (toString $o.podCreatorCheck)) -}}
{{- end -}}
{{- if ne $w.failurePolicy "Fail" -}}
{{- fail (printf "operator.podCreatorCheck %q needs admissionWebhook.failurePolicy Fail: a job created while the webhook is skipped keeps whatever creator record its author wrote" (toString $o.podCreatorCheck)) -}}
{{- end -}}
{{- if and (not .Values.watchNamespace) $w.namespaceSelector -}}
{{- fail (printf "operator.podCreatorCheck %q with admissionWebhook.namespaceSelector: the operator watches every namespace, and a job created in a namespace the selector leaves out keeps whatever creator record its author wrote. Leave namespaceSelector empty, or set watchNamespace" (toString $o.podCreatorCheck)) -}}
{{- end -}}
{{- end -}}
{{- if and $w.enabled (not $w.certificate.generate) (not $w.certificate.secretName) -}}
{{- fail "admissionWebhook.certificate.generate is false: set admissionWebhook.certificate.secretName to the kubernetes.io/tls Secret with the webhook's certificate" -}}
{{- end -}}
{{- if and $w.enabled (not $w.certificate.generate) (not $w.certificate.caBundle) (not (regexMatch "inject-ca" (keys ($w.annotations | default dict) | join ","))) -}}
{{- fail "admissionWebhook.certificate.generate is false: set admissionWebhook.certificate.caBundle to the CA that signed the webhook's certificate, or an annotation that has it injected (cert-manager.io/inject-ca-from, OpenShift's service.beta.openshift.io/inject-cabundle) (without either, the apiserver trusts no certificate and, under failurePolicy Fail, refuses every job create and update)" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (ne (toString .Values.podDisruptionBudget.minAvailable) "<nil>") (ne (toString .Values.podDisruptionBudget.maxUnavailable) "<nil>") -}}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable, not both (set the other to null)" -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions on the jobs, wherever it watches them. Nothing else: no Secrets, no ConfigMaps. */}}
{{- define "bgjobs.rules" -}}
- apiGroups: ["bgjobs.dev"]
  resources: ["backgroundjobs"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["bgjobs.dev"]
  resources: ["backgroundjobs/status"]
  verbs: ["get", "update"]
- apiGroups: ["bgjobs.dev"]
  resources: ["recurringbackgroundjobs"]
  verbs: ["get", "list", "watch"]
{{- if .Values.operator.recurringEnabled }}
# Recurring schedules: create each tick's job, cancel the job a tick replaces, record the schedule's status.
- apiGroups: ["bgjobs.dev"]
  resources: ["backgroundjobs"]
  verbs: ["create", "patch"]
- apiGroups: ["bgjobs.dev"]
  resources: ["recurringbackgroundjobs/status"]
  verbs: ["get", "update"]
{{- end }}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.podMode.enabled }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- end }}
{{- if include "bgjobs.creatorCheck" . }}
# The creator check asks, per Pod, whether the job's creator may create pods (namespaced: a Role suffices).
- apiGroups: ["authorization.k8s.io"]
  resources: ["localsubjectaccessreviews"]
  verbs: ["create"]
{{- end }}
{{- end -}}

{{/* The Secret with the admission webhook's serving certificate (tls.crt, tls.key). */}}
{{- define "bgjobs.admissionSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "bgjobs.fullname" .)) .Values.admissionWebhook.certificate.secretName -}}
{{- end -}}

{{/* Non-empty when operator.podCreatorCheck is on (an unquoted YAML `off` arrives as false). */}}
{{- define "bgjobs.creatorCheck" -}}
{{- if not (has (toString .Values.operator.podCreatorCheck) (list "off" "false")) -}}on{{- end -}}
{{- end -}}

{{/* `<fullname>-<suffix>` within 63 characters (a Service's name is a DNS label): the full name gives way, never the
suffix, so that two such names never come out the same. Call with (dict "context" . "suffix" "metrics"). */}}
{{- define "bgjobs.suffixed" -}}
{{- $full := include "bgjobs.fullname" .context | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $full .suffix -}}
{{- end -}}

{{/* The report Service's name. */}}
{{- define "bgjobs.reportsService" -}}
{{- include "bgjobs.suffixed" (dict "context" . "suffix" "reports") -}}
{{- end -}}

{{/* The URL workers report to: reports.url, or the report Service's cluster DNS name. */}}
{{- define "bgjobs.reportUrl" -}}
{{- if .Values.reports.url -}}
{{- .Values.reports.url -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "bgjobs.reportsService" .) .Release.Namespace (.Values.reports.service.port | int) -}}
{{- end -}}
{{- end -}}
