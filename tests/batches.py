"""A minimal in-memory batch source for loop tests: the data contract the Trainer needs."""

import torch


class ListBatches:
    """The loop's data contract: forever(), __iter__ (one epoch), state_dict(), load_state_dict()."""

    def __init__(self, examples, batch_size):
        self.examples, self.batch_size, self.index = examples, batch_size, 0

    def next(self):
        rows = [
            self.examples[(self.index + i) % len(self.examples)] for i in range(self.batch_size)
        ]
        self.index += self.batch_size
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def forever(self):
        while True:
            yield self.next()

    def __iter__(self):
        for start in range(0, len(self.examples), self.batch_size):
            yield ListBatches(self.examples[start:], self.batch_size).next()

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]
