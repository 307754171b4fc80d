"""The model summary `vlp` prints at the start of `fit`: Lightning's rich table without the FLOPs column.

Lightning's summary counts FLOPs only by running `example_input_array`, which no method defines (a batch of views,
captions and masks is not one tensor), so its FLOPs column and total read 0 for every method. This summary shows
the same table (name, type, parameters, mode, plus In/Out sizes if a method ever sets an example input) and the
parameter totals, and shows FLOPs only when they were measured.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size
from typing_extensions import override


class VLPModelSummary(RichModelSummary):
    """`RichModelSummary` that leaves out FLOPs that were not counted (all zero)."""

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops > 0]
        table = Table(header_style="bold magenta")
        for name, _ in columns:  # the first column (" ") is the row index
            table.add_column(name, style="dim" if name == " " else None,
                             justify="right" if name in {"Params", "FLOPs", "In sizes", "Out sizes"} else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        totals = Table.grid(expand=True)
        totals.add_column()
        lines = [
            f"Trainable params: {get_human_readable_count(int(trainable_parameters))}",
            f"Non-trainable params: {get_human_readable_count(int(total_parameters - trainable_parameters))}",
            f"Total params: {get_human_readable_count(int(total_parameters))}",
            f"Total estimated model params size (MB): {get_formatted_model_size(model_size)}",
            f"Modules in train mode: {total_training_modes['train']}, in eval mode: {total_training_modes['eval']}",
        ]
        if total_flops > 0:
            lines.append(f"Total FLOPs: {get_human_readable_count(total_flops)}")
        for line in lines:
            totals.add_row(line)
        console.print(totals)
