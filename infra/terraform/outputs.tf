output "bucket_name" {
  description = "The data bucket."
  value       = aws_s3_bucket.data.id
}

output "bucket_arn" {
  description = "ARN of the data bucket."
  value       = aws_s3_bucket.data.arn
}

output "manifest_uri" {
  description = "Where job manifests go (read-only for the nodes): the spec's `manifest:` lives under it."
  value       = "s3://${aws_s3_bucket.data.id}/${var.manifest_prefix}"
}

output "output_uri" {
  description = "Where job outputs go (read/write for the nodes): the spec's `output:` lives under it."
  value       = "s3://${aws_s3_bucket.data.id}/${var.output_prefix}"
}

output "data_access_policy_arn" {
  description = "The least-privilege bucket policy; attach it to any other identity that runs jobs (e.g. the IAM user behind a KubeRay Secret)."
  value       = aws_iam_policy.data_access.arn
}

output "head_instance_profile_name" {
  description = "IamInstanceProfile.Name of the head node type in cluster/aws-gpu.yaml."
  value       = aws_iam_instance_profile.head.name
}

output "worker_instance_profile_name" {
  description = "IamInstanceProfile.Name of the GPU worker node type in cluster/aws-gpu.yaml."
  value       = aws_iam_instance_profile.worker.name
}

output "dlami_id" {
  description = "ImageId for cluster/aws-gpu.yaml: the current Deep Learning Base GPU AMI in this region."
  value       = var.dlami_ssm_parameter == "" ? null : data.aws_ssm_parameter.dlami[0].insecure_value
}

output "irsa_role_arn" {
  description = "With create_irsa_role: the eks.amazonaws.com/role-arn annotation for infra/kuberay/serviceaccount.yaml."
  value       = var.create_irsa_role ? aws_iam_role.irsa[0].arn : null
}
