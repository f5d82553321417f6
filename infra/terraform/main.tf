# The AWS side of sdbatch: the bucket that holds manifests and outputs, a
# least-privilege policy for it, and the identities that carry that policy:
#   - instance profiles for the Ray cluster launcher's nodes (cluster/aws-gpu.yaml):
#     the head also gets the EC2 rights its autoscaler needs to launch GPU workers;
#   - optionally, an IRSA role for KubeRay pods on EKS (infra/kuberay).

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

data "aws_partition" "current" {}

locals {
  bucket_arn = aws_s3_bucket.data.arn
  # The write probe sdbatch puts and deletes at the root of every output before a job
  # (store.check_writable); the only key the nodes may delete.
  write_probe_key = "_sdbatch_write_probe"
}

# ---------------------------------------------------------------- bucket

resource "aws_s3_bucket" "data" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket = aws_s3_bucket.data.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Created only when wanted: removing it later suspends versioning (the provider's
# documented behaviour); an unversioned bucket never needs the resource at all.
resource "aws_s3_bucket_versioning" "data" {
  count  = var.versioning_enabled ? 1 : 0
  bucket = aws_s3_bucket.data.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  # A worker killed mid-upload (spot reclaim, OOM) leaves invisible multipart parts
  # that are billed until aborted.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  dynamic "rule" {
    for_each = var.versioning_enabled ? [1] : []
    content {
      id     = "expire-noncurrent-versions"
      status = "Enabled"

      filter {}

      noncurrent_version_expiration {
        noncurrent_days = var.noncurrent_version_expiration_days
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.data]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.data]
}

# ---------------------------------------------------------------- data access policy

# What an sdbatch job needs, nothing more: read the manifest prefix; read, write and
# list the output prefix (resume lists what is done, commit writes parts and _SUCCESS);
# delete only the write probe. Nothing outside the two prefixes.
data "aws_iam_policy_document" "data_access" {
  statement {
    sid       = "ListManifestAndOutputPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    # Note: S3 answers a HEAD/GET of a missing key with 403 (not 404) unless the
    # caller may list the bucket *without* a prefix condition; sdbatch's S3 store must
    # not rely on 404 from HEAD to mean "absent".
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values = [
        var.manifest_prefix, "${var.manifest_prefix}*",
        var.output_prefix, "${var.output_prefix}*",
      ]
    }
  }

  statement {
    sid       = "ReadManifests"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.manifest_prefix}*"]
  }

  statement {
    sid = "ReadWriteOutputs"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      # Large Parquet parts go up as multipart uploads; let a failed one clean up.
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/${var.output_prefix}*"]
  }

  statement {
    sid     = "DeleteOnlyTheWriteProbe"
    actions = ["s3:DeleteObject"]
    resources = [
      "${local.bucket_arn}/${var.output_prefix}${local.write_probe_key}",
      "${local.bucket_arn}/${var.output_prefix}*/${local.write_probe_key}",
    ]
  }
}

resource "aws_iam_policy" "data_access" {
  name        = "${var.name_prefix}-data-access"
  description = "sdbatch: read s3://${var.bucket_name}/${var.manifest_prefix}, write s3://${var.bucket_name}/${var.output_prefix}"
  policy      = data.aws_iam_policy_document.data_access.json
}

# ---------------------------------------------------------------- Ray node identities

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.name_prefix}-ray-worker"
  description        = "Ray GPU workers of cluster/aws-gpu.yaml: bucket access only"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "worker_data" {
  role       = aws_iam_role.worker.name
  policy_arn = aws_iam_policy.data_access.arn
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name_prefix}-ray-worker"
  role = aws_iam_role.worker.name
}

resource "aws_iam_role" "head" {
  name               = "${var.name_prefix}-ray-head"
  description        = "Ray head of cluster/aws-gpu.yaml: bucket access + launching its workers"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "head_data" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.data_access.arn
}

# Ray's default head role is AmazonEC2FullAccess + AmazonS3FullAccess; this is what its
# autoscaler actually calls, with changes limited to instances of this cluster.
data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid       = "Describe"
    actions   = ["ec2:Describe*"]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid = "ManageOwnInstances"
    actions = [
      "ec2:CreateTags",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:TerminateInstances",
    ]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:*:*:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.ray_cluster_name]
    }
  }

  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "head_autoscaler" {
  name   = "${var.name_prefix}-ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name_prefix}-ray-head"
  role = aws_iam_role.head.name
}

data "aws_ssm_parameter" "dlami" {
  count = var.dlami_ssm_parameter == "" ? 0 : 1
  name  = var.dlami_ssm_parameter
}

# ---------------------------------------------------------------- IRSA (KubeRay on EKS)

locals {
  # oidc.eks.REGION.amazonaws.com/id/ID: the condition-key prefix of the provider.
  oidc_issuer = var.create_irsa_role ? element(split("oidc-provider/", var.eks_oidc_provider_arn), 1) : ""
}

data "aws_iam_policy_document" "irsa_assume" {
  count = var.create_irsa_role ? 1 : 0

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  count              = var.create_irsa_role ? 1 : 0
  name               = "${var.name_prefix}-irsa"
  description        = "KubeRay pods of infra/kuberay (service account ${var.k8s_namespace}/${var.k8s_service_account})"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[0].json

  lifecycle {
    precondition {
      condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+", var.eks_oidc_provider_arn))
      error_message = "create_irsa_role needs eks_oidc_provider_arn (arn:aws:iam::ACCOUNT:oidc-provider/...)."
    }
  }
}

resource "aws_iam_role_policy_attachment" "irsa_data" {
  count      = var.create_irsa_role ? 1 : 0
  role       = aws_iam_role.irsa[0].name
  policy_arn = aws_iam_policy.data_access.arn
}
