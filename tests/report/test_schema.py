"""The report's JSON is a contract: its fields change only with its schema_version."""

import hashlib
import json

from compress.report.schema import SCHEMA_VERSION, Report

# sha256 of the JSON schema of `Report` at this SCHEMA_VERSION. A change to the report's fields
# fails here: bump SCHEMA_VERSION when a field changes meaning, then update the digest.
DIGEST = {
    2: "08f8e12cbd1d6973db667da1afb17776365d884890f7a4ff8ed213390c87433f",
    3: "35ed2281b16a5198e4b2d92c6eed28004a6bf0eaccc2f201f9f8feae3a057907",  # typed per-layer errors
    4: "4900eaf37c445a424d6b5287687bf25e50b1cddd028c5403837acd862fcac57c",  # timing interleaved, tasks, reuse
    5: "89330804a674aadd0da3d5cf77d7b1f58dd7a393921dc0816789d5ac6bb11a02",  # search candidates
    6: "a7f644ce25788014b836c8fab31aaf2b0300b534de38a0586d401949df6b7fbb",  # divergence (KL, top-1)
    7: "1a2fa4192dc19640632bb068c80d1a6d4ba1ce960d4d7675096641088ae3ef66",  # expert_tokens (mixture of experts)
    8: "ed61eb1c0eeac43b4bf2a50129ad9e82feeafbd4d844e14963df258d42ed596a",  # domains (evaluate.also)
    9: "573ac345530eef36aaa5ed13656c68e638be58eb921d6e11e0e802148bdc6db4",  # linear_bits (mixed precision)
    10: "725890e1130cf504be7a4028bbe3929693461a7c369131527eaf14ddeb012a15",  # Training.compute
}


def test_schema_is_stable_for_its_version():
    schema = json.dumps(Report.model_json_schema(), sort_keys=True)
    assert hashlib.sha256(schema.encode()).hexdigest() == DIGEST[SCHEMA_VERSION]
