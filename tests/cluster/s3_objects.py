"""The objects under a prefix of the test S3 server, for the object-storage tests."""

from __future__ import annotations


def list_objects(s3, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    """key (relative to ``prefix``) → (ETag, LastModified) of every object under it (not the
    empty ``dir/`` markers pyarrow leaves when it deletes a directory): the same ETag and
    LastModified mean the object was not rewritten."""
    out, token = {}, None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix + "/"}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        for o in r.get("Contents", []):
            if not o["Key"].endswith("/"):
                out[o["Key"][len(prefix) + 1:]] = (o["ETag"], o["LastModified"])
        if not r.get("IsTruncated"):
            return out
        token = r["NextContinuationToken"]
