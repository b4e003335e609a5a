"""`mlmjob infer`: batch fill-mask over text files, streamed, sharded and restartable.

A file is read as a stream (S3 ranged reads; gzip, recognised by its magic bytes,
decompressed as it is read) and cut into parts of L = `infer.lines_per_part` lines: part k
holds lines kL+1..(k+1)L (the last one fewer; part 0 exists even for an empty file). A part
is named by its input and line range, never by the input's place in the list (which shifts
when inputs come and go): `{infer.output}/part-<name>-<sha256(URI)[:12]>-lines-<first>-<last>`
`.jsonl`. Its lines are predicted a window at a time and written to a local staging file as
they come, so memory grows neither with the part nor with the file; the finished file is
uploaded, then its `.done` marker commits it, recording the input's URI, fingerprint (size +
ETag on S3, size + mtime locally) and line range. A rerun skips a part only when its marker
matches the input as it is now, so a changed file is redone and a new one done; worker 0
deletes the parts of inputs that are gone (and those of another `lines_per_part`). No line
is lost or written twice.

Part k of input i (inputs sorted) goes to worker (i + k) mod W, where the W workers are
every process of every pod (`--worker-index` x torchrun's ranks): a big file's parts go
round all the workers, and files of one part each are dealt round-robin as whole files.

Output: one JSON line per input line, in input order:
    {"file": ..., "line": N, "masks": [[{"score", "token", "token_str", "sequence"}, ...], ...]}
`masks` holds, per <mask> in the line, what `pipeline("fill-mask")` returns for it (the
pipeline itself returns a bare list when the line has one mask). A bad line gets
{"file", "line", "error"} instead.
"""
