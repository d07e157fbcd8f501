"""Reports back by STOW-RS are retried like those by C-STORE: attempts and the next attempt's due time

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("push_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("push_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_studies_push_next_at", ["push_next_at"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_push_next_at")
        batch.drop_column("push_next_at")
        batch.drop_column("push_attempts")
