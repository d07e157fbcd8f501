"""The review UI: users, browser sessions, readers' calls; audit rows name the reader

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_users_username", "users", ["username"], unique=True)
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ui_sessions_token_sha256", "ui_sessions", ["token_sha256"], unique=True)
    op.create_index("ix_ui_sessions_user_id", "ui_sessions", ["user_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("call", sa.String(16), nullable=False),
        sa.Column("birads", sa.String(4), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("called_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "user_id", name="uq_review_study_user"),
    )
    op.create_index("ix_reviews_study_instance_uid", "reviews", ["study_instance_uid"])
    op.create_index("ix_reviews_user_id", "reviews", ["user_id"])
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", name="fk_audit_log_user_id"),
                                   nullable=True))
        batch.create_index("ix_audit_log_user_id", ["user_id"])


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_index("ix_audit_log_user_id")
        batch.drop_constraint("fk_audit_log_user_id", type_="foreignkey")
        batch.drop_column("user_id")
    op.drop_table("reviews")
    op.drop_table("ui_sessions")
    op.drop_table("users")
