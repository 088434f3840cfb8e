CREATE TABLE "actions" (
	"id" text PRIMARY KEY NOT NULL,
	"request_id" text,
	"request_hash" text,
	"run_id" text DEFAULT '' NOT NULL,
	"cluster" text NOT NULL,
	"label_selector" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"payload" jsonb,
	"priority" integer DEFAULT 0 NOT NULL,
	"max_attempts" integer NOT NULL,
	"initial_backoff_ms" integer NOT NULL,
	"backoff_multiplier" double precision NOT NULL,
	"max_backoff_ms" integer NOT NULL,
	"max_system_retries" integer NOT NULL,
	"state" text NOT NULL,
	"epoch" bigint DEFAULT 0 NOT NULL,
	"attempt_count" integer DEFAULT 0 NOT NULL,
	"failure_count" integer DEFAULT 0 NOT NULL,
	"system_retry_count" integer DEFAULT 0 NOT NULL,
	"session_id" text,
	"worker_id" text,
	"granted_at" timestamp with time zone,
	"cancel_requested" boolean DEFAULT false NOT NULL,
	"output" jsonb,
	"last_error" jsonb,
	"failure_reason" text DEFAULT '' NOT NULL,
	"phase" text DEFAULT '' NOT NULL,
	"checkpoint" jsonb,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"not_before" timestamp with time zone DEFAULT now() NOT NULL,
	"finished_at" timestamp with time zone
);
--> statement-breakpoint
CREATE TABLE "attempts" (
	"action_id" text NOT NULL,
	"epoch" bigint NOT NULL,
	"worker_id" text NOT NULL,
	"session_id" text NOT NULL,
	"outcome" text NOT NULL,
	"error" jsonb,
	"started_at" timestamp with time zone DEFAULT now() NOT NULL,
	"ended_at" timestamp with time zone,
	CONSTRAINT "attempts_action_id_epoch_pk" PRIMARY KEY("action_id","epoch")
);
--> statement-breakpoint
CREATE TABLE "clusters" (
	"name" text PRIMARY KEY NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "events" (
	"sequence" bigserial PRIMARY KEY NOT NULL,
	"kind" text NOT NULL,
	"at" timestamp with time zone DEFAULT now() NOT NULL,
	"action_id" text,
	"worker_id" text,
	"cluster" text,
	"session_id" text,
	"epoch" bigint,
	"lease_id" text,
	"message" text DEFAULT '' NOT NULL,
	"details" jsonb
);
--> statement-breakpoint
CREATE TABLE "sessions" (
	"id" text PRIMARY KEY NOT NULL,
	"worker_id" text NOT NULL,
	"server_id" text,
	"started_at" timestamp with time zone DEFAULT now() NOT NULL,
	"deadline" timestamp with time zone NOT NULL,
	"stream_lost_at" timestamp with time zone,
	"ended_at" timestamp with time zone,
	"end_reason" text
);
--> statement-breakpoint
CREATE TABLE "workers" (
	"worker_id" text PRIMARY KEY NOT NULL,
	"cluster" text NOT NULL,
	"capacity" integer NOT NULL,
	"labels" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"agent_version" text DEFAULT '' NOT NULL,
	"draining" boolean DEFAULT false NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"last_seen_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "attempts" ADD CONSTRAINT "attempts_action_id_actions_id_fk" FOREIGN KEY ("action_id") REFERENCES "public"."actions"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "sessions" ADD CONSTRAINT "sessions_worker_id_workers_worker_id_fk" FOREIGN KEY ("worker_id") REFERENCES "public"."workers"("worker_id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "actions_request_id_key" ON "actions" USING btree ("request_id");--> statement-breakpoint
CREATE INDEX "actions_claim_idx" ON "actions" USING btree ("cluster","priority" DESC NULLS LAST,"created_at") WHERE "actions"."state" = 'QUEUED';--> statement-breakpoint
CREATE INDEX "actions_session_idx" ON "actions" USING btree ("session_id") WHERE "actions"."state" = 'LEASED';--> statement-breakpoint
CREATE INDEX "actions_run_idx" ON "actions" USING btree ("run_id");--> statement-breakpoint
CREATE INDEX "actions_state_idx" ON "actions" USING btree ("state","cluster");--> statement-breakpoint
CREATE INDEX "events_action_idx" ON "events" USING btree ("action_id","sequence");--> statement-breakpoint
CREATE INDEX "events_worker_idx" ON "events" USING btree ("worker_id","sequence");--> statement-breakpoint
CREATE INDEX "events_cluster_idx" ON "events" USING btree ("cluster","sequence");--> statement-breakpoint
CREATE UNIQUE INDEX "sessions_one_live_per_worker" ON "sessions" USING btree ("worker_id") WHERE "sessions"."ended_at" is null;--> statement-breakpoint
CREATE INDEX "sessions_live_deadline_idx" ON "sessions" USING btree ("deadline") WHERE "sessions"."ended_at" is null;--> statement-breakpoint
CREATE INDEX "workers_cluster_idx" ON "workers" USING btree ("cluster");