variable "region" {
  description = "AWS region of the bucket and the Ray nodes."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Name of the S3 bucket for manifests and outputs (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lowercase letters, digits, '.' or '-'."
  }
}

variable "name_prefix" {
  description = "Prefix of the IAM role, policy and instance profile names. cluster/aws-gpu.yaml assumes the default."
  type        = string
  default     = "sdbatch"
}

variable "ray_cluster_name" {
  description = "cluster_name in cluster/aws-gpu.yaml: the head may stop/terminate only instances Ray tagged with it."
  type        = string
  default     = "sdbatch-gpu"
}

variable "manifest_prefix" {
  description = "Key prefix the jobs read manifests (and init images) from: read-only for the nodes."
  type        = string
  default     = "manifests/"

  validation {
    condition     = can(regex("^[^/].*/$", var.manifest_prefix))
    error_message = "manifest_prefix must not start with '/' and must end with '/'."
  }
}

variable "output_prefix" {
  description = "Key prefix the jobs write images and metadata under: read/write for the nodes."
  type        = string
  default     = "outputs/"

  validation {
    condition     = can(regex("^[^/].*/$", var.output_prefix))
    error_message = "output_prefix must not start with '/' and must end with '/'."
  }
}

variable "versioning_enabled" {
  description = "Keep old versions of overwritten or deleted objects (costs storage; sdbatch never overwrites an image)."
  type        = bool
  default     = false
}

variable "noncurrent_version_expiration_days" {
  description = "With versioning on: delete old object versions after this many days."
  type        = number
  default     = 30
}

variable "abort_incomplete_multipart_days" {
  description = "Abort multipart uploads left incomplete (e.g. by a killed worker) after this many days."
  type        = number
  default     = 3

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1
    error_message = "abort_incomplete_multipart_days must be at least 1."
  }
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a bucket that still holds objects."
  type        = bool
  default     = false
}

variable "dlami_ssm_parameter" {
  description = "Public SSM parameter holding the GPU AMI id for cluster/aws-gpu.yaml (empty: skip the lookup)."
  type        = string
  default     = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}

variable "create_irsa_role" {
  description = "Also create an IAM role for KubeRay pods on EKS (IRSA), bound to one Kubernetes service account."
  type        = bool
  default     = false
}

variable "eks_oidc_provider_arn" {
  description = "With create_irsa_role: ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::ACCOUNT:oidc-provider/oidc.eks.REGION.amazonaws.com/id/ID)."
  type        = string
  default     = ""
}

variable "k8s_namespace" {
  description = "With create_irsa_role: namespace of the service account (infra/kuberay/serviceaccount.yaml)."
  type        = string
  default     = "sdbatch"
}

variable "k8s_service_account" {
  description = "With create_irsa_role: name of the service account."
  type        = string
  default     = "sdbatch"
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = { project = "sdbatch" }
}
